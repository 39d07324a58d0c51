"""The q-learning paper's network (its Table 1): ``[s, x] -> 64 tanh -> 64 relu -> d``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..nets import mlp
from .base import Backbone


class MLPBackbone(Backbone):
    def __init__(self, dim: int, hidden: int = 64, activations: tuple[str, ...] = ("tanh", "relu"),
                 out_dim: int | None = None):
        super().__init__()
        self.event_shape = (dim,)
        # time enters as one extra input feature
        self.net = mlp(dim + 1, [hidden] * len(activations), dim if out_dim is None else out_dim, activations)

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        return self.net(torch.cat([x, s.reshape(-1, 1).to(x.dtype)], dim=-1))
