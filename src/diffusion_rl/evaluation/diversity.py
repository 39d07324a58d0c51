"""Sequence diversity: mean pairwise Levenshtein distance (ELEGANT §8, "Div"; following
Ghari et al. 2023). Computed with rapidfuzz's C++ ``cdist``, never a Python double loop."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist
from torch import Tensor

__all__ = ["tokens_to_strings", "levenshtein_matrix", "mean_pairwise_levenshtein"]

#: tokens are written as the characters chr(_OFFSET + t); any non-NUL code point works
_OFFSET = 0x41  # 'A'


def tokens_to_strings(tokens: Tensor | np.ndarray) -> list[str]:
    """``LongTensor [N, L]`` -> ``N`` strings of length ``L`` (token ``t`` -> ``chr(65 + t)``).

    Vectorised: the ``[N, L]`` code points are reinterpreted as numpy ``<U{L}`` strings.
    """
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be [N, L], got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() + _OFFSET >= 0xD800):
        raise ValueError("tokens must be in [0, 0xD800 - 65) to map to characters")
    codes = np.ascontiguousarray((arr + _OFFSET).astype("<u4"))
    return codes.view(f"<U{arr.shape[1]}").reshape(-1).tolist() if arr.shape[1] else [""] * arr.shape[0]


def _as_strings(seqs: Tensor | np.ndarray | Sequence[str]) -> list[str]:
    if isinstance(seqs, (Tensor, np.ndarray)):
        return tokens_to_strings(seqs)
    return list(seqs)


def levenshtein_matrix(a: Tensor | Sequence[str], b: Tensor | Sequence[str] | None = None,
                       workers: int = -1) -> np.ndarray:
    """``int32 [len(a), len(b)]`` Levenshtein distances (``b = a`` when omitted)."""
    sa = _as_strings(a)
    sb = sa if b is None else _as_strings(b)
    return cdist(sa, sb, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)


def mean_pairwise_levenshtein(tokens: Tensor | Sequence[str], workers: int = -1,
                              chunk_size: int = 4096) -> float:
    """Mean Levenshtein distance over the ``N (N - 1)`` ordered pairs ``i != j`` of a sample.

    Args:
        tokens: ``LongTensor [N, L]`` (mapped to characters) or ``N`` strings (any lengths).
        workers: rapidfuzz threads (``-1``: all cores).
        chunk_size: rows of the distance matrix computed at once (memory ``chunk_size x N``).

    For i.i.d. draws this is an unbiased estimate of ``E_{x, y ~ p i.i.d.}[d(x, y)]`` (pairs of
    independent draws that happen to coincide count with distance 0).
    """
    strings = _as_strings(tokens)
    n = len(strings)
    if n < 2:
        raise ValueError(f"mean_pairwise_levenshtein needs at least 2 sequences (got {n})")
    if n <= chunk_size:
        # queries *is* choices: rapidfuzz then uses the metric's symmetry and computes each pair
        # once (measured: 2.0 s instead of 3.7 s for 1,000 GFP-length strings on 2 cores)
        return int(cdist(strings, strings, scorer=Levenshtein.distance, dtype=np.int32,
                         workers=workers).sum(dtype=np.int64)) / (n * (n - 1))
    total = 0
    for start in range(0, n, chunk_size):  # blocks of rows; the pairwise work is inside cdist
        block = cdist(strings[start:start + chunk_size], strings, scorer=Levenshtein.distance,
                      dtype=np.int32, workers=workers)
        total += int(block.sum(dtype=np.int64))
    return total / (n * (n - 1))  # the diagonal is 0
