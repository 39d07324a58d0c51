"""The small networks every part of the project builds: MLPs, sinusoidal time features, and
MLPs on ``[flatten(x), time features]`` (classifiers and time-conditioned value networks).

Backbones, oracles, ELEGANT's value function, guidance's classifier and the q-learning critic
use these builders instead of each writing its own ``Linear`` loop; the layer order (and so the
parameter names ``net.0.weight``, … and the initialisation order) is the same as theirs was.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str | Sequence[str] = "silu",
        output_activation: str | None = None) -> nn.Sequential:
    """``Linear -> act`` per hidden width, then ``Linear(out_dim)`` (and ``output_activation``).
    ``activation`` is one name for every layer or one per hidden layer."""
    acts = [activation] * len(hidden) if isinstance(activation, str) else list(activation)
    if len(acts) != len(hidden):
        raise ValueError(f"{len(hidden)} hidden widths need as many activations (got {len(acts)})")
    for name in [*acts, *([output_activation] if output_activation else [])]:
        if name not in ACTIVATIONS and name != "sigmoid":
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} (got {name!r})")
    if any(int(h) <= 0 for h in hidden):
        raise ValueError(f"hidden widths must be positive (got {list(hidden)})")
    layers: list[nn.Module] = []
    width = int(in_dim)
    for h, act in zip(hidden, acts):
        layers += [nn.Linear(width, int(h)), ACTIVATIONS[act]()]
        width = int(h)
    layers.append(nn.Linear(width, int(out_dim)))
    if output_activation:
        layers.append(nn.Sigmoid() if output_activation == "sigmoid" else ACTIVATIONS[output_activation]())
    return nn.Sequential(*layers)


class SinusoidalTimeFeatures(nn.Module):
    """``s [B] -> [B, dim]``: ``[sin(w_k c s), cos(w_k c s)]`` with ``w_k = 10000^{-k/(dim/2)}``
    and ``c`` the process's ``time_scale``."""

    freqs: Tensor

    def __init__(self, dim: int, time_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"time feature dim must be a positive even number (got {dim})")
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0 (got {time_scale})")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.time_scale = float(time_scale)

    def forward(self, s: Tensor) -> Tensor:
        args = self.time_scale * s.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class FlatMLP(nn.Module):
    """``x [B, *E] -> [B]`` (``out_dim = 1``) or ``[B, out_dim]``: an MLP on the flattened sample."""

    def __init__(self, event_shape: Sequence[int], hidden: Sequence[int] = (256, 256), activation: str = "silu",
                 out_dim: int = 1):
        super().__init__()
        self.event_shape = _check_event_shape(event_shape)
        self.net = mlp(math.prod(self.event_shape), hidden, out_dim, activation)

    def forward(self, x: Tensor) -> Tensor:
        return _squeeze(self.net(x.flatten(1)))


class TimeConditionedMLP(nn.Module):
    """``(x [B, *E], s [B]) -> [B]`` (or ``[B, out_dim]``): an MLP on ``[flatten(x), time
    features of s]`` — guidance's noisy-data classifier and time-conditioned value networks."""

    def __init__(self, event_shape: Sequence[int], hidden: Sequence[int] = (256, 256), time_dim: int = 32,
                 time_scale: float = 1000.0, activation: str = "silu", out_dim: int = 1):
        super().__init__()
        self.event_shape = _check_event_shape(event_shape)
        self.time_features = SinusoidalTimeFeatures(time_dim, time_scale)
        self.net = mlp(math.prod(self.event_shape) + time_dim, hidden, out_dim, activation)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        n = len(self.event_shape)
        if tuple(x.shape[-n:]) != self.event_shape:
            raise ValueError(f"expected x [B, {', '.join(map(str, self.event_shape))}], got {tuple(x.shape)}")
        s = torch.as_tensor(s, device=x.device).reshape(-1).expand(x.shape[0])
        return _squeeze(self.net(torch.cat([x.flatten(1), self.time_features(s).to(x.dtype)], dim=-1)))


def _check_event_shape(event_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in event_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"event_shape must be non-empty with positive sizes (got {event_shape})")
    return shape


def _squeeze(out: Tensor) -> Tensor:
    return out.squeeze(-1) if out.shape[-1] == 1 else out
