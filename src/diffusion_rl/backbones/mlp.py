"""The q-learning paper's network (its Table 1): ``[s, x] -> 64 tanh -> 64 relu -> d``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Backbone

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}


class MLPBackbone(Backbone):
    def __init__(self, dim: int, hidden: int = 64, activations: tuple[str, ...] = ("tanh", "relu"),
                 out_dim: int | None = None):
        super().__init__()
        self.event_shape = (dim,)
        layers, width = [], dim + 1  # time enters as one extra input feature
        for act in activations:
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[act]()]
            width = hidden
        layers.append(nn.Linear(width, dim if out_dim is None else out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        return self.net(torch.cat([x, s.reshape(-1, 1).to(x.dtype)], dim=-1))
