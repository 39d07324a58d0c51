"""Seeds derived from the run's one ``seed`` and a role name.

Every random stream of a run (chain noise, data draws, a network's initial weights, the
evaluation) gets its own generator whose seed is a stable function of ``(seed, role)``, so
adding a draw in one place never shifts another stream. ``hash()`` is salted per process in
Python, hence SHA-256.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *roles: object) -> int:
    """A 63-bit seed for ``roles`` (e.g. ``"data"``, a rank) derived from ``seed``."""
    text = ":".join(str(part) for part in (int(seed), *roles))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
