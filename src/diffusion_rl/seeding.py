"""Seeds derived from the run's one ``seed`` and a role name.

Every random stream of a run (chain noise, data draws, a network's initial weights, the
evaluation) gets its own generator whose seed is a stable function of ``(seed, role)``, so
adding a draw in one place never shifts another stream. ``hash()`` is salted per process in
Python, hence SHA-256.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator


def derive_seed(seed: int, *roles: object) -> int:
    """A 63-bit seed for ``roles`` (e.g. ``"data"``, a rank) derived from ``seed``."""
    text = ":".join(str(part) for part in (int(seed), *roles))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def chain_seed(seed: int, rank: int = 0) -> int:
    """The seed of a fine-tuning method's chain-noise generator on DDP rank ``rank``.

    Rank 0 (every single-process run) keeps the run's ``seed`` itself, so a one-device run's
    numbers are what they were; the other ranks derive theirs (``seed + rank`` would give rank
    1 of seed 0 the chains of rank 0 of seed 1, and a sweep's seeds would share chains)."""
    return int(seed) if rank == 0 else derive_seed(seed, "chains", rank)


@contextmanager
def seeded_global_rng(seed: int, *roles: object) -> Iterator[None]:
    """Run a block on a fork of torch's global CPU generator seeded with ``derive_seed(seed, *roles)``.

    ``torch.nn`` layers draw their initial weights from the global generator and take no
    generator argument, and a ``DataLoader`` without one draws its base seed there too. The
    composition root (``runner.py``) therefore builds each network — and runs each fit — inside
    this block: what the block draws depends on its seed and role only, never on what ran
    before it (a cache hit skips a whole fit and its draws), and the caller's generator state
    is given back unchanged afterwards (so this is not global seeding)."""
    import torch  # here, not at the top: validation imports this module and must stay torch-free

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *roles))
        yield
