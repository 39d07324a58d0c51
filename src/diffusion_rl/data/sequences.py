"""Shared containers and encodings for biological sequence datasets.

Sequences are stored as integer tokens ``LongTensor[N, L]`` (index into ``alphabet``)
and converted to one-hot ``FloatTensor[N, L, V]`` only where a model needs it, which
keeps the GFP table (51,715 x 237) small in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["one_hot", "SequenceData"]


def one_hot(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One-hot encode integer tokens.

    Args:
        tokens: ``LongTensor[..., L]`` with values in ``[0, vocab_size)``.
        vocab_size: ``V``, the alphabet size.

    Returns:
        ``FloatTensor[..., L, V]`` with a single 1.0 per position.
    """
    return F.one_hot(tokens.long(), num_classes=vocab_size).float()


@dataclass
class SequenceData:
    """A labelled set of fixed-length sequences.

    Attributes:
        tokens: ``LongTensor[N, L]``, indices into ``alphabet``.
        y: ``FloatTensor[N]``, one scalar label (fitness / reward) per row.
        alphabet: ``V`` characters; ``alphabet[i]`` is the letter of token ``i``.
        name: short identifier of the dataset (and split) for logs and reports.
    """

    tokens: torch.Tensor
    y: torch.Tensor
    alphabet: str
    name: str

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [N, L], got shape {tuple(self.tokens.shape)}")
        if self.y.ndim != 1 or self.y.shape[0] != self.tokens.shape[0]:
            raise ValueError(
                f"y must be [N] with N={self.tokens.shape[0]}, got shape {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        """Sequence length ``L``."""
        return int(self.tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        """Alphabet size ``V``."""
        return len(self.alphabet)

    def one_hot(self) -> torch.Tensor:
        """All rows as ``FloatTensor[N, L, V]``."""
        return one_hot(self.tokens, self.vocab_size)

    def subset(self, index: torch.Tensor, name: str | None = None) -> "SequenceData":
        """Rows selected by ``index`` (``LongTensor[M]`` or ``BoolTensor[N]``), same alphabet."""
        return SequenceData(
            tokens=self.tokens[index],
            y=self.y[index],
            alphabet=self.alphabet,
            name=self.name if name is None else name,
        )

    def to_strings(self, tokens: torch.Tensor | None = None) -> list[str]:
        """Decode tokens to strings.

        Args:
            tokens: ``LongTensor[M, L]`` or ``LongTensor[L]``; defaults to ``self.tokens``.

        Returns:
            ``M`` strings of length ``L`` (a single-element list for a 1-D input).
        """
        if tokens is None:
            tokens = self.tokens
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        letters = self.alphabet
        return ["".join(letters[t] for t in row) for row in tokens.tolist()]
