"""Rewards: ``nn.Module``s mapping decoded samples ``[B, *E]`` (and a condition) to ``[B]``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Reward(nn.Module):
    #: whether gradients of the reward w.r.t. the sample are meaningful (reward backprop)
    differentiable: bool = True

    def forward(self, x: Tensor, cond=None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class BoxIndicator(Reward):
    """``1`` inside the axis-aligned box ``[low, high]`` (the Swiss-roll reward), else ``0``."""

    differentiable = False

    def __init__(self, low, high):
        super().__init__()
        low, high = torch.as_tensor(list(low), dtype=torch.float32), torch.as_tensor(list(high), dtype=torch.float32)
        if low.shape != high.shape or (low > high).any():
            raise ValueError("reward.low and reward.high must have the same length with low <= high")
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, x: Tensor, cond=None) -> Tensor:
        return ((x >= self.low) & (x <= self.high)).all(-1).to(x.dtype)


class QuadraticTarget(Reward):
    """``-scale |x - target|^2``: prefers samples near ``target`` (the 1-D example, eq. 34)."""

    differentiable = True

    def __init__(self, target, scale: float = 1.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"reward.scale must be > 0 (got {scale})")
        self.register_buffer("target", torch.as_tensor(target, dtype=torch.float32).reshape(-1))
        self.scale = float(scale)

    def forward(self, x: Tensor, cond=None) -> Tensor:
        return -self.scale * ((x - self.target) ** 2).sum(-1)
