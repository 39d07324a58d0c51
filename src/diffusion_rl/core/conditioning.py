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


#: what a condition source is asked for: a training batch, or the evaluation's chains
SPLITS = ("train", "eval")


class ConditionSource:
    """Where a method's chains get their conditioning: ``sample(n, generator, device, split)
    -> Cond``. The source draws on ``generator``'s own device (training passes the method's CPU
    ``data_generator``, the evaluation its chain generator) and returns tensors on ``device``;
    ``split`` says whether the chains are a training batch or the evaluation's (text-to-image
    runs train and evaluate on different prompts)."""

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu",
               split: str = "train") -> Cond:
        raise NotImplementedError


class Unconditional(ConditionSource):
    """The unconditional tasks (toy data, sequences)."""

    def sample(self, n, generator, device="cpu", split="train") -> Cond:
        return None


class PromptSource(ConditionSource):
    """Prompts as rows of a backbone's embedding table: ``{"prompt": [B] long}``. Rows
    ``0 .. num_train-1`` are the training prompts, drawn uniformly with replacement; the
    ``num_eval`` rows after them are the evaluation prompts, which the evaluation's chains
    cycle through in order (chain ``i`` gets evaluation prompt ``i mod num_eval``), so an
    evaluation is the same prompts whatever the run."""

    def __init__(self, num_train: int, num_eval: int):
        if num_train < 1 or num_eval < 1:
            raise ValueError(f"a prompt source needs training and evaluation prompts (got {num_train}, {num_eval})")
        self.num_train, self.num_eval = int(num_train), int(num_eval)

    def sample(self, n, generator, device="cpu", split="train") -> Cond:
        if split == "train":
            rows = torch.randint(0, self.num_train, (n,), generator=generator, device=generator.device)
        elif split == "eval":
            rows = self.num_train + torch.arange(n) % self.num_eval
        else:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
        return {"prompt": rows.to(device)}
