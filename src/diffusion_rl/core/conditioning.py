"""Conditioning: a mapping of per-chain tensors, and where a method draws it from.

A chain's conditioning is ``None`` (unconditional tasks) or a mapping ``name -> Tensor``
whose tensors all have the batch as their first dimension: text embeddings ``[B, L, D]``,
negative-prompt embeddings, a per-chain guidance scale ``[B]``, class labels ``[B]``. The
rollout hands it to the policy unchanged; code that takes chains apart (PPO minibatches) or
recomputes all steps in one batch indexes or repeats every entry the same way, so a
backbone never sees conditioning that belongs to another chain.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

Cond = Optional[Mapping[str, Tensor]]


def check_cond(cond: Cond, batch: int) -> None:
    """Every entry is a tensor with ``batch`` rows."""
    if cond is None:
        return
    if not isinstance(cond, Mapping):
        raise TypeError(f"conditioning must be None or a mapping name -> tensor (got {type(cond).__name__})")
    for name, value in cond.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"conditioning '{name}' must be a tensor with {batch} rows (one per chain), got {shape}")


def index_cond(cond: Cond, idx: Tensor) -> Cond:
    """The conditioning of the chains ``idx``."""
    return None if cond is None else {name: value[idx.to(value.device)] for name, value in cond.items()}


def repeat_cond(cond: Cond, times: int) -> Cond:
    """Conditioning for ``times`` stacked copies of the batch (``[times * B, ...]``, copy-major),
    as when every step of a trajectory is recomputed in one call."""
    if cond is None:
        return None
    return {name: value.repeat(times, *([1] * (value.dim() - 1))) for name, value in cond.items()}


class ConditionSource:
    """Where a method's chains get their conditioning: ``sample(n, generator) -> Cond``.
    ``generator`` is the method's CPU ``data_generator`` (a prompt sampler draws indices);
    the source moves its tensors to ``device``."""

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Cond:
        raise NotImplementedError


class Unconditional(ConditionSource):
    """The unconditional tasks (toy data, sequences)."""

    def sample(self, n, generator, device="cpu") -> Cond:
        return None
