"""SHA-256 verification of the offline data files.

Every folder under ``shared/data`` carries a ``SHA256SUMS`` file (``sha256sum -c``
format) and a ``PROVENANCE.md`` that says where each file came from. Loaders call
:func:`verify_files` before reading anything, so a missing or altered file fails
loudly with one actionable line instead of silently producing a different dataset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["DataFileError", "verify_files", "sha256_file", "read_sha256sums"]

_CHUNK_BYTES = 1 << 20

# Successful verifications, keyed by (resolved path, mtime_ns, size). A file that is
# rewritten changes mtime or size, so a stale entry can never vouch for new bytes.
_VERIFIED: dict[tuple[str, int, int], str] = {}


class DataFileError(RuntimeError):
    """A data file is missing, unlisted, or does not match its recorded sha256."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of ``path``, read in 1 MiB chunks so large files stay cheap in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sha256sums(folder: Path) -> dict[str, str]:
    """Parse ``folder/SHA256SUMS`` into ``{file name: lower-case hex digest}``.

    Accepts both ``sha256sum`` text mode (``<hex>  <name>``) and binary mode
    (``<hex> *<name>``).
    """
    sums_path = Path(folder) / "SHA256SUMS"
    if not Path(folder).is_dir():  # no folder at all, hence no PROVENANCE.md to point at either
        raise DataFileError(f"{folder}: no such data folder; check the data folder setting (paths.data_dir, "
                            "or DIFFUSION_RL_DATA_DIR)")
    if not sums_path.is_file():
        raise DataFileError(
            f"{sums_path}: missing checksum list; restore the folder as described in "
            f"{_provenance_hint(Path(folder))}"
        )
    sums: dict[str, str] = {}
    for line in sums_path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def _provenance_hint(folder: Path) -> str:
    provenance = folder / "PROVENANCE.md"
    # never point at a file that is not there
    return str(provenance) if provenance.is_file() else f"shared/data/README.md ({folder} has no PROVENANCE.md)"


def _cache_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _verify_one(folder: Path, name: str, expected: str | None) -> None:
    path = folder / name
    hint = _provenance_hint(folder)
    if expected is None:
        raise DataFileError(
            f"{path}: not listed in {folder / 'SHA256SUMS'}; see {hint} for the expected files"
        )
    if not path.is_file():
        raise DataFileError(f"{path}: file is missing; see {hint} for where to get it")
    key = _cache_key(path)
    if _VERIFIED.get(key) == expected:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise DataFileError(
            f"{path}: sha256 mismatch (expected {expected[:16]}…, got {actual[:16]}…); "
            f"the file was altered or truncated, re-fetch it as described in {hint}"
        )
    _VERIFIED[key] = expected


def verify_files(folder: Path, names: list[str]) -> None:
    """Check that every file in ``names`` exists in ``folder`` with the sha256 in SHA256SUMS.

    Args:
        folder: data folder containing ``SHA256SUMS`` and ``PROVENANCE.md``.
        names: file names (relative to ``folder``) that the caller is about to read.

    Raises:
        DataFileError: one line naming the file, what is wrong (missing, unlisted,
            or sha256 mismatch with expected/actual prefixes) and pointing to the
            folder's ``PROVENANCE.md`` for how to obtain it.
    """
    folder = Path(folder)
    sums = read_sha256sums(folder)
    for name in names:
        _verify_one(folder, name, sums.get(name))
