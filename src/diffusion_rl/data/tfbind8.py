"""TFBind8 (design-bench ``TFBind8-Exact-v0``, SIX6_REF_R1) loader, split and exact oracle.

The two ``.npy`` files are byte-identical to the design-bench server files (see
``shared/data/tfbind8/PROVENANCE.md``): x is ``int32[65792, 8]`` over ``0=A,1=C,2=G,3=T``
and y is the min-max-normalised E-score, ``float32[65792, 1]``. All 4**8 = 65,536
8-mers appear; the 256 reverse-complement palindromes appear twice with the same y.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffusion_rl.data.checksums import verify_files
from diffusion_rl.data.sequences import SequenceData

__all__ = [
    "TFBIND8_ALPHABET",
    "TFBIND8_LENGTH",
    "TFBIND8_FILES",
    "load_tfbind8",
    "tfbind8_train_split",
    "tokens_to_index",
    "TFBind8ExactLookup",
]

TFBIND8_ALPHABET = "ACGT"
TFBIND8_LENGTH = 8
TFBIND8_FILES = ["tf_bind_8-x-0.npy", "tf_bind_8-y-0.npy"]
_N_ROWS = 65_792


def _resolve_folder(data_dir: Path | str) -> Path:
    """Accept either the ``tfbind8`` folder itself or the shared-data root above it."""
    folder = Path(data_dir)
    if not (folder / TFBIND8_FILES[0]).exists() and (folder / "tfbind8").is_dir():
        folder = folder / "tfbind8"
    return folder


def load_tfbind8(data_dir: Path | str) -> SequenceData:
    """Load the full design-bench TFBind8 table after verifying its checksums.

    Args:
        data_dir: the ``shared/data/tfbind8`` folder (or ``shared/data`` itself).

    Returns:
        ``SequenceData`` with ``tokens`` ``LongTensor[65792, 8]`` (0..3 = ACGT, row order
        of the design-bench file) and ``y`` ``FloatTensor[65792]``.
    """
    folder = _resolve_folder(data_dir)
    verify_files(folder, TFBIND8_FILES)
    x = np.load(folder / TFBIND8_FILES[0])
    y = np.load(folder / TFBIND8_FILES[1]).astype(np.float32).reshape(-1)
    if x.shape != (_N_ROWS, TFBIND8_LENGTH) or y.shape != (_N_ROWS,):
        raise ValueError(f"unexpected TFBind8 shapes x={x.shape}, y={y.shape} in {folder}")
    return SequenceData(
        tokens=torch.from_numpy(x.astype(np.int64)),
        y=torch.from_numpy(y),
        alphabet=TFBIND8_ALPHABET,
        name="tfbind8",
    )


def tfbind8_train_split(data: SequenceData) -> SequenceData:
    """design-bench ``TFBind8-Exact-v0`` training set: rows with ``y <= median(y)``.

    design-bench registers the task with ``max_percentile=50, min_percentile=0,
    max_samples=None``, and ``DatasetBuilder.subsample`` keeps ``y <= np.percentile(y, 50)``.
    On the full table this is 32,898 rows. design-bench shuffles the order; we keep the
    file order so the split is deterministic without any RNG.

    Args:
        data: output of :func:`load_tfbind8`.

    Returns:
        ``SequenceData`` with ``tokens`` ``[32898, 8]`` and ``y`` ``[32898]``.
    """
    y = data.y.numpy()
    threshold = np.percentile(y, 50)
    keep = torch.from_numpy(np.flatnonzero(y <= threshold))
    return data.subset(keep, name=f"{data.name}_train_p50")


def tokens_to_index(tokens: torch.Tensor) -> torch.Tensor:
    """Base-4 index of 8-mers, first token most significant.

    Args:
        tokens: ``LongTensor[..., 8]`` with values in 0..3.

    Returns:
        ``LongTensor[...]`` in ``[0, 4**8)``.
    """
    weights = 4 ** torch.arange(TFBIND8_LENGTH - 1, -1, -1, device=tokens.device)
    return (tokens.long() * weights).sum(dim=-1)


class TFBind8ExactLookup(nn.Module):
    """Exact TFBind8 oracle: a ``4**8`` table of y indexed by the base-4 8-mer code.

    This is design-bench's ``Exact`` oracle (a lookup over the full 65,792 rows). The
    table is a registered buffer so ``.to(device)`` moves it with the model.
    """

    table: torch.Tensor

    def __init__(self, data: SequenceData) -> None:
        super().__init__()
        if data.length != TFBIND8_LENGTH or data.vocab_size != 4:
            raise ValueError(f"expected 8-mers over 4 letters, got L={data.length}, V={data.vocab_size}")
        self.register_buffer("table", self._build_table(data.tokens, data.y))

    @staticmethod
    def _build_table(tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[4**8]`` from tokens ``[N, 8]`` and y ``[N]``; checks coverage/consistency."""
        index = tokens_to_index(tokens)
        size = 4**TFBIND8_LENGTH
        table = torch.full((size,), float("nan"), dtype=torch.float32)
        table[index] = y.float()
        # Palindromic 8-mers occur twice (once per strand); both rows must agree, or the
        # "exact" oracle would depend on which duplicate happened to be written last.
        if not torch.equal(table[index], y.float()):
            bad = int((table[index] != y.float()).sum())
            raise ValueError(f"TFBind8 duplicate 8-mers disagree on y in {bad} rows")
        if torch.isnan(table).any():
            missing = int(torch.isnan(table).sum())
            raise ValueError(f"TFBind8 table does not cover all 4**8 8-mers ({missing} missing)")
        return table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact y for a batch of 8-mers.

        Args:
            x: ``LongTensor[B, 8]`` tokens, or ``FloatTensor[B, 8, 4]`` one-hot / logits
                (decoded by argmax).

        Returns:
            ``FloatTensor[B]``.
        """
        if x.is_floating_point():
            x = x.argmax(dim=-1)
        return self.table[tokens_to_index(x)]
