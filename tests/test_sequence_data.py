"""Tests for the sequence data loaders (TFBind8, GFP proxy) and checksum verification."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from diffusion_rl.data.checksums import DataFileError, verify_files
from diffusion_rl.data.gfp import (
    GFP_ALPHABET,
    GFP_NAME,
    GFPFormatError,
    gfp_elegant_train_split,
    load_gfp,
    load_gfp_reference,
)
from diffusion_rl.data.sequences import SequenceData, one_hot
from diffusion_rl.data.tfbind8 import (
    TFBIND8_FILES,
    TFBind8ExactLookup,
    load_tfbind8,
    tfbind8_train_split,
)


def shared_data_dir() -> Path:
    """``$DIFFUSION_RL_SHARED_DATA`` if set, else ``shared/data`` next to the repo root."""
    env = os.environ.get("DIFFUSION_RL_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _data_folder(name: str) -> Path:
    folder = shared_data_dir() / name
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent")
    return folder


@pytest.fixture(scope="module")
def tfbind8_dir() -> Path:
    return _data_folder("tfbind8")


@pytest.fixture(scope="module")
def gfp_dir() -> Path:
    return _data_folder("gfp")


@pytest.fixture(scope="module")
def tfbind8(tfbind8_dir: Path) -> SequenceData:
    return load_tfbind8(tfbind8_dir)


@pytest.fixture(scope="module")
def gfp(gfp_dir: Path) -> SequenceData:
    return load_gfp(gfp_dir)


def _writable_copy(src: Path, dst: Path) -> Path:
    """Copy a read-only data folder so tests can damage the copy."""
    shutil.copytree(src, dst)
    for path in dst.iterdir():
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return dst


# ---------------------------------------------------------------- encodings


def test_one_hot_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (3, 5, 237), generator=gen)
    x = one_hot(tokens, 20)
    assert x.shape == (3, 5, 237, 20)
    assert x.dtype == torch.float32
    assert torch.equal(x.sum(-1), torch.ones(3, 5, 237))
    assert torch.equal(x.argmax(-1), tokens)


def test_sequence_data_properties() -> None:
    data = SequenceData(
        tokens=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]),
        y=torch.tensor([0.5, 1.0]),
        alphabet="ACGT",
        name="toy",
    )
    assert (len(data), data.length, data.vocab_size) == (2, 4, 4)
    assert data.to_strings(data.tokens) == ["ACGT", "TGCA"]
    assert data.to_strings(data.tokens[0]) == ["ACGT"]
    with pytest.raises(ValueError):
        SequenceData(tokens=torch.zeros(2, 4, dtype=torch.long), y=torch.zeros(3), alphabet="ACGT", name="bad")


# ---------------------------------------------------------------- TFBind8


def test_tfbind8_full_and_train_split(tfbind8: SequenceData) -> None:
    assert tfbind8.tokens.shape == (65_792, 8)
    assert tfbind8.tokens.dtype == torch.long
    assert tfbind8.y.shape == (65_792,)
    assert tfbind8.y.dtype == torch.float32
    assert tfbind8.alphabet == "ACGT"
    assert tfbind8.to_strings(tfbind8.tokens[:2]) == ["AAAAAAAA", "AAAAAAAC"]
    train = tfbind8_train_split(tfbind8)
    assert len(train) == 32_898
    assert float(train.y.max()) <= float(torch.quantile(tfbind8.y.double(), 0.5)) + 1e-7
    # Deterministic: two calls give identical rows in identical order.
    assert torch.equal(tfbind8_train_split(tfbind8).tokens, train.tokens)


def test_tfbind8_exact_lookup_matches_all_rows(tfbind8: SequenceData) -> None:
    oracle = TFBind8ExactLookup(tfbind8)
    assert oracle.table.shape == (4**8,)
    assert torch.equal(oracle(tfbind8.tokens), tfbind8.y)
    assert torch.equal(oracle(one_hot(tfbind8.tokens[:100], 4)), tfbind8.y[:100])
    # First token is the most significant base-4 digit: AAAAAAAC -> index 1.
    assert oracle.table[1] == tfbind8.y[1]


def test_tfbind8_lookup_rejects_inconsistent_duplicates(tfbind8: SequenceData) -> None:
    tokens = torch.cat([tfbind8.tokens, tfbind8.tokens[:1]])
    y = torch.cat([tfbind8.y, tfbind8.y[:1] + 0.5])
    with pytest.raises(ValueError, match="disagree"):
        TFBind8ExactLookup(SequenceData(tokens=tokens, y=y, alphabet="ACGT", name="bad"))


# ---------------------------------------------------------------- GFP


def test_gfp_loads_proxy_table(gfp: SequenceData, gfp_dir: Path) -> None:
    assert gfp.tokens.shape == (51_715, 237)
    assert gfp.y.shape == (51_715,)
    assert gfp.alphabet == GFP_ALPHABET
    assert gfp.name == GFP_NAME and "proxy" in gfp.name
    assert int(gfp.tokens.max()) < 20
    reference = load_gfp_reference(gfp_dir)
    assert gfp.to_strings(reference)[0].startswith("SKGEELFTGVVPILVELDGD")
    # Row 0 of the TSV is the wild type (no mutations, medianBrightness 3.7192).
    assert torch.equal(gfp.tokens[0], reference)
    assert abs(float(gfp.y[0]) - 3.7192121) < 1e-5
    assert int((gfp.tokens == reference).all(dim=1).sum()) == 1
    assert abs(float(gfp.y.mean()) - 2.6579) < 1e-3


def test_gfp_elegant_split_selects_top(gfp: SequenceData) -> None:
    split = gfp_elegant_train_split(gfp, top_fraction=0.1)
    assert abs(len(split) - 0.1 * len(gfp)) <= 5
    rest = float(torch.quantile(gfp.y.double(), 0.9))
    assert float(split.y.min()) >= rest - 1e-6
    capped = gfp_elegant_train_split(gfp, top_fraction=0.5, max_samples=5000)
    assert len(capped) == 5000
    assert float(capped.y.min()) >= float(torch.sort(gfp.y, descending=True).values[4999])
    with pytest.raises(ValueError):
        gfp_elegant_train_split(gfp, top_fraction=0.0)


def test_gfp_wild_type_mismatch_is_reported(gfp_dir: Path, tmp_path: Path) -> None:
    folder = _writable_copy(gfp_dir, tmp_path / "gfp")
    tsv = folder / "amino_acid_genotypes_to_brightness.tsv"
    text = tsv.read_text()
    assert "\nSA108D\t" in text
    tsv.write_text(text.replace("\nSA108D\t", "\nSW108D\t", 1))
    # Re-sign the edited table so the format check, not the checksum, is what fails.
    sums = folder / "SHA256SUMS"
    digest = hashlib.sha256(tsv.read_bytes()).hexdigest()
    lines = [
        f"{digest}  {tsv.name}" if line.endswith(tsv.name) else line
        for line in sums.read_text().splitlines()
    ]
    sums.write_text("\n".join(lines) + "\n")
    with pytest.raises(GFPFormatError, match="position 108"):
        load_gfp(folder)


# ---------------------------------------------------------------- checksums


def test_checksum_detects_corrupted_file(tfbind8_dir: Path, tmp_path: Path) -> None:
    folder = _writable_copy(tfbind8_dir, tmp_path / "tfbind8")
    target = folder / "tf_bind_8-y-0.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataFileError) as info:
        load_tfbind8(folder)
    message = str(info.value)
    assert "tf_bind_8-y-0.npy" in message and "sha256 mismatch" in message
    assert "PROVENANCE.md" in message and "\n" not in message


def test_checksum_detects_missing_file(tfbind8_dir: Path, tmp_path: Path) -> None:
    folder = _writable_copy(tfbind8_dir, tmp_path / "tfbind8")
    (folder / "tf_bind_8-x-0.npy").unlink()
    with pytest.raises(DataFileError, match=r"tf_bind_8-x-0\.npy.*missing.*PROVENANCE\.md"):
        load_tfbind8(folder)


def test_checksum_cache_does_not_hide_later_corruption(tfbind8_dir: Path, tmp_path: Path) -> None:
    folder = _writable_copy(tfbind8_dir, tmp_path / "tfbind8")
    verify_files(folder, TFBIND8_FILES)
    verify_files(folder, TFBIND8_FILES)  # second call is served from the cache
    target = folder / "tf_bind_8-y-0.npy"
    # Appending changes the size, so the (path, mtime, size) cache key cannot match even
    # when the filesystem's mtime resolution is coarser than the two writes.
    with open(target, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataFileError, match="tf_bind_8-y-0.npy"):
        verify_files(folder, TFBIND8_FILES)


def test_checksum_rejects_unlisted_file(tfbind8_dir: Path, tmp_path: Path) -> None:
    folder = _writable_copy(tfbind8_dir, tmp_path / "tfbind8")
    with pytest.raises(DataFileError, match="not listed"):
        verify_files(folder, ["PROVENANCE.md"])
