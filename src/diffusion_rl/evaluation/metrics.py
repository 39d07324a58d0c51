"""Sample-based metrics shared by every method, so rows of a table are comparable."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval over independent batch statistics ``[n]``."""
    values = values.double()
    n = values.numel()
    half = 1.96 * values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), half


def knn_kl(x: Tensor, y: Tensor, k: int = 1) -> Tensor:
    """k-NN estimate of KL(P ‖ Q) from ``x ~ P`` and ``y ~ Q`` (Wang, Kulkarni & Verdú 2009).

    ``D = d/n sum_i log(nu_k(i) / rho_k(i)) + log(m / (n - 1))`` with ``rho_k(i)`` the distance
    from ``x_i`` to its k-th nearest neighbour among the other ``x`` and ``nu_k(i)`` to its k-th
    nearest neighbour among ``y``. Batched: ``x [..., n, d]``, ``y [..., m, d]`` → ``[...]``.
    """
    n, d, m = x.shape[-2], x.shape[-1], y.shape[-2]
    if n < k + 1 or m < k:
        raise ValueError("knn_kl needs more than k samples from each distribution")
    x, y = x.double(), y.double()
    dxx = torch.cdist(x, x)
    dxx.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    rho = dxx.kthvalue(k, dim=-1).values
    nu = torch.cdist(x, y).kthvalue(k, dim=-1).values
    tiny = torch.finfo(torch.float64).tiny  # duplicated points would give log 0
    return d * (nu.clamp_min(tiny).log() - rho.clamp_min(tiny).log()).mean(-1) + math.log(m / (n - 1))


def mean_pairwise_distance(x: Tensor) -> Tensor:
    """``[...]`` mean Euclidean distance over distinct pairs of ``x [..., n, d]`` (vector diversity)."""
    n = x.shape[-2]
    return torch.cdist(x, x).sum((-1, -2)) / (n * (n - 1))
