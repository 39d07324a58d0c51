"""The exact score of a Gaussian-mixture data law plus a trainable residual: the policy class of
the 2-D mixture bench (``conf/experiment/exact_gaussian_mixture.yaml``).

Under a Gaussian forward process ``x_s = alpha(s) x_0 + sigma(s) eps`` the marginal of the data
``sum_i w_i N(mu_i, s_i^2 I)`` is the mixture ``sum_i w_i N(alpha mu_i, (alpha^2 s_i^2 + sigma^2) I)``,
whose score is ``sum_i p_s(i | x) (alpha mu_i - x) / (alpha^2 s_i^2 + sigma^2)``: the pretrained
model is exact, nothing is learnt from data (``pretrain: null``), and what a fine-tuned chain
reaches is the method's, not a pretraining error's.

The fine-tuned part is a time-conditioned MLP added to the output, its last layer zero at
initialisation, so the untrained policy *is* the pretrained model (and its frozen copy, the
reference). The KL-regularised optimum in continuous time is the score of the noised *tilted*
mixture (its marginals are the forward noising of ``∝ exp(r/alpha) p_data``), which differs from
the pretrained score by a smooth function of ``(x, s)``: the residual can represent it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..core.processes import ForwardProcess
from ..data.toy import GaussianMixture2D
from ..nets import TimeConditionedMLP
from .base import Backbone


def noised_mixture_score(x: Tensor, alpha: Tensor, sigma: Tensor, weights: Tensor, means: Tensor,
                         stds: Tensor) -> Tensor:
    """``[B, d]`` score of ``sum_i w_i N(alpha mu_i, (alpha^2 s_i^2 + sigma^2) I)`` at ``x [B, d]``
    for per-sample ``alpha, sigma [B]``; differentiable in ``x`` (reward backprop goes through it)."""
    a, sig = alpha.reshape(-1, 1).to(x.dtype), sigma.reshape(-1, 1).to(x.dtype)
    var = a**2 * stds.to(x.dtype) ** 2 + sig**2                      # [B, C]
    centres = a[:, :, None] * means.to(x.dtype)                      # [B, C, d]
    diff = centres - x[:, None, :]                                   # [B, C, d]
    logits = torch.log(weights.to(x.dtype)) - 0.5 * (diff**2).sum(-1) / var - 0.5 * x.shape[-1] * torch.log(var)
    resp = torch.softmax(logits, dim=-1)                             # p_s(i | x)
    return (resp[..., None] * diff / var[..., None]).sum(1)


class MixtureScore(Backbone):
    """``output(x, s) = from_score(exact noised-mixture score) + residual(x, s)``."""

    def __init__(self, process: ForwardProcess, weights: Sequence[float], means: Sequence[Sequence[float]],
                 stds: Sequence[float], hidden: Sequence[int] = (64, 64), time_dim: int = 16,
                 activation: str = "silu", time_scale: float | None = None):
        super().__init__()
        try:
            process.marginal_coeffs(torch.tensor(process.T))
        except NotImplementedError:
            raise ValueError(f"backbone=mixture_score needs a process with Gaussian marginals "
                             f"({type(process).__name__} has none)") from None
        mixture = GaussianMixture2D(weights, means, stds)  # validates the parameters
        self.process = process
        self.event_shape = (mixture.dim,)
        dtype = torch.get_default_dtype()
        self.register_buffer("weights", mixture.weights.to(dtype))
        self.register_buffer("means", mixture.means.to(dtype))
        self.register_buffer("stds", mixture.stds.to(dtype))
        self.residual = TimeConditionedMLP(self.event_shape, list(hidden), time_dim,
                                           process.time_scale if time_scale is None else time_scale,
                                           activation, out_dim=mixture.dim)
        last = self.residual.net[-1]
        with torch.no_grad():  # zero residual: the untrained policy is the exact pretrained model
            last.weight.zero_()
            last.bias.zero_()

    def exact_score(self, x: Tensor, s: Tensor) -> Tensor:
        alpha, sigma = self.process.marginal_coeffs(s.reshape(-1).to(x.device))
        return noised_mixture_score(x, alpha, sigma, self.weights, self.means, self.stds)

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        s = torch.as_tensor(s, device=x.device).reshape(-1).expand(x.shape[0])
        exact = self.process.from_score(x, s, self.exact_score(x, s))
        return exact + self.residual(x, s).to(x.dtype)
