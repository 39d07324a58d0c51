"""Nonparametric score of the noised data distribution (q-learning paper, eqs. 17–18).

``grad log p_s(x) = E_{x0}[grad_x p_{s|0}(x | x0)] / E_{x0}[p_{s|0}(x | x0)]``; with ``n`` data
samples both expectations become sample means, and the denominator is floored at ``delta``
so that states far from every data point do not divide by (numerically) zero. When the
denominator is above the floor this equals the softmax-weighted form
``sum_i w_i (alpha x0_i - x) / sigma^2`` with ``w = softmax_i(log p_{s|0}(x | x0_i))``,
which is how we compute it (in log space, so tiny densities do not underflow).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .processes import ForwardProcess


def ratio_score(process: ForwardProcess, x: Tensor, s: Tensor, data: Tensor, delta: float) -> Tensor:
    """``[B, d]`` estimated score at states ``x [B, d]``, per-sample times ``s [B]`` (> 0),
    from data samples ``data [n, d]``."""
    alpha, sigma = process.marginal_coeffs(s)
    alpha, var = alpha.to(x).unsqueeze(-1), (sigma**2).to(x).unsqueeze(-1)  # [B, 1]
    d = x.shape[-1]
    # |alpha x0_i - x|^2 expanded so that no [B, n, d] tensor is built (a matmul instead)
    sq_dist = (alpha**2 * (data**2).sum(-1) - 2 * alpha * (x @ data.T) + (x**2).sum(-1, keepdim=True))  # [B, n]
    log_p = -0.5 * sq_dist / var - 0.5 * d * torch.log(2 * math.pi * var)  # [B, n]
    log_mean_p = torch.logsumexp(log_p, dim=1, keepdim=True) - math.log(data.shape[0])  # [B, 1]
    posterior_mean = torch.softmax(log_p, dim=1) @ data  # E[x0 | x_s = x], [B, d]
    posterior_score = (alpha * posterior_mean - x) / var  # Tweedie
    # E[p] / max(E[p], delta): 1 above the floor, shrinks the score towards 0 below it
    shrink = torch.exp(log_mean_p - torch.clamp(log_mean_p, min=math.log(delta)))
    return shrink * posterior_score
