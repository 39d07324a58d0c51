"""A per-step affine score ``a_k x + b_k`` on a sampler's time grid: the policy class of the
closed-form Gaussian bench (METHODS_SPEC §0.3). With N(0, 1) data under the stationary OU
process the exact score is ``-x`` at every time (``a = -1, b = 0``), and every
KL-regularised method's optimum on an Euler–Maruyama chain is again affine per step, so
this class holds the pretrained model *and* every target exactly: what a method reaches is
then the method, not the network's capacity."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Backbone


class AffineStepScore(Backbone):
    """``score_k(x) = a_k x + b_k`` for the step whose grid time is nearest ``s`` (1-D)."""

    def __init__(self, times: Tensor, slopes: Tensor | None = None, intercepts: Tensor | None = None):
        super().__init__()
        K = times.numel() - 1
        if K < 1:
            raise ValueError("AffineStepScore needs a grid of at least 2 times")
        self.event_shape = (1,)
        self.register_buffer("grid", times[:-1].clone())
        self.a = nn.Parameter(torch.full((K,), -1.0) if slopes is None else slopes.clone().float())
        self.b = nn.Parameter(torch.zeros(K) if intercepts is None else intercepts.clone().float())

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        k = (s.reshape(-1, 1).to(self.grid.dtype) - self.grid).abs().argmin(1)
        return self.a[k].unsqueeze(-1) * x + self.b[k].unsqueeze(-1)


def uniform_grid_affine_score(num_steps: int, T: float, t_min: float = 0.0, slope: float = -1.0,
                              intercept: float = 0.0) -> AffineStepScore:
    """The config entry point: the uniform grid a continuous process's sampler uses
    (``ForwardProcess.time_grid``), every step starting at ``slope x + intercept``."""
    times = torch.linspace(T, t_min, int(num_steps) + 1)
    K = int(num_steps)
    return AffineStepScore(times, torch.full((K,), float(slope)), torch.full((K,), float(intercept)))
