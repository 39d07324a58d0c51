"""Closed forms for a linear-Gaussian chain with a quadratic reward: the test bed every
KL-regularised method is measured against (METHODS_SPEC §0.3).

The pretrained chain is ``x_{k+1} = A_k x_k + c_k + sigma_k xi_k`` from ``x_0 ~ N(m_0, P_0)``
and the reward is ``r(x) = -lam (x - target)^2`` (1-D). A policy of the same class keeps
the variances ``sigma_k^2`` and replaces the means by ``a_k x + b_k``; its per-step KL to
the pretrained chain is ``(m^theta_k(x) - m^pre_k(x))^2 / (2 sigma_k^2)`` at the visited
state. Three targets, each closed form:

* :func:`fixed_variance_optimum` maximises ``E r(x_K) - alpha E sum_k KL_k`` over that class
  (dynamic programming with the quadratic value ``-q_k (x - h_k)^2``): reward backprop with
  the full window, ELEGANT's drift control, PPO + KL with KL-to-go, RW-MLE, CTRL;
* :func:`myopic_kl_equilibrium` is where a method lands whose KL gradient is taken at fixed
  states with no KL-to-go (DPOK, the tutorial's soft PPO): each step maximises the
  reward-only continuation value minus its own KL;
* :func:`tilted_terminal` is ``p(x) ∝ exp(r(x)/alpha) p_pre(x)`` of the pretrained chain's
  terminal law (the variance is free there: SMC's target, the continuous-time limit).

Everything is torch and differentiable in the policy's coefficients, so the exact gradient
of ``E[path KL]`` is one ``backward`` away (the policy-gradient estimators are tested
against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LinearGaussianChain:
    """The pretrained chain: ``A, c, var`` are ``[K]`` (``var = sigma_k^2 > 0``)."""

    A: Tensor
    c: Tensor
    var: Tensor
    prior_mean: float
    prior_var: float

    @property
    def num_steps(self) -> int:
        return int(self.A.numel())

    def terminal(self, slopes: Tensor, intercepts: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``x_K`` when step ``k``'s mean is ``slopes[k] x + intercepts[k]``."""
        mean, var = self._moments(slopes, intercepts)
        return mean[-1], var[-1]

    def path_kl(self, slopes: Tensor, intercepts: Tensor) -> Tensor:
        """``E sum_k KL_k`` along the policy's own chain (the path KL every method reports)."""
        mean, var = self._moments(slopes, intercepts)
        ds, di = slopes - self.A, intercepts - self.c  # the mean difference is ds x + di
        return (((ds * mean[:-1] + di) ** 2 + ds**2 * var[:-1]) / (2 * self.var)).sum()

    def expected_reward(self, slopes: Tensor, intercepts: Tensor, lam: float, target: float) -> Tensor:
        mean, var = self.terminal(slopes, intercepts)
        return -lam * ((mean - target) ** 2 + var)

    def pretrained(self) -> tuple[Tensor, Tensor]:
        return self.A.clone(), self.c.clone()

    def _moments(self, slopes: Tensor, intercepts: Tensor) -> tuple[Tensor, Tensor]:
        mean = [torch.as_tensor(self.prior_mean, dtype=self.A.dtype)]
        var = [torch.as_tensor(self.prior_var, dtype=self.A.dtype)]
        for k in range(self.num_steps):
            mean.append(slopes[k] * mean[-1] + intercepts[k])
            var.append(slopes[k] ** 2 * var[-1] + self.var[k])
        return torch.stack(mean), torch.stack(var)


def _optimal_means(chain: LinearGaussianChain, alpha: float, lam: float, target: float,
                   myopic: bool) -> tuple[Tensor, Tensor]:
    """Backward recursion of ``v_k(x) = -q_k (x - h_k)^2 + const``; the best mean of step
    ``k`` against ``v_{k+1}`` is ``(A x + c + g h_{k+1}) / (1 + g)``, ``g = 2 q_{k+1} sigma_k^2 / alpha``.

    Full objective: ``q_k = q_{k+1} A^2 / (1 + g)`` (the future KL is part of the value);
    myopic: ``q_k = q_{k+1} A^2 / (1 + g)^2`` (the value is the reward only)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (got {alpha})")
    q, h = torch.as_tensor(lam, dtype=chain.A.dtype), torch.as_tensor(target, dtype=chain.A.dtype)
    slopes, intercepts = [None] * chain.num_steps, [None] * chain.num_steps
    for k in reversed(range(chain.num_steps)):
        A, c = chain.A[k], chain.c[k]
        g = 2 * q * chain.var[k] / alpha
        slopes[k], intercepts[k] = A / (1 + g), (c + g * h) / (1 + g)
        q = q * A**2 / ((1 + g) ** 2 if myopic else (1 + g))
        h = (h - c) / A
    return torch.stack(slopes), torch.stack(intercepts)


def fixed_variance_optimum(chain: LinearGaussianChain, alpha: float, lam: float, target: float):
    """Means ``(slopes, intercepts)`` maximising ``E r(x_K) - alpha E[path KL]``."""
    return _optimal_means(chain, alpha, lam, target, myopic=False)


def myopic_kl_equilibrium(chain: LinearGaussianChain, alpha: float, lam: float, target: float):
    """Means where a per-step KL gradient at fixed states (no KL-to-go) is stationary."""
    return _optimal_means(chain, alpha, lam, target, myopic=True)


def tilted_terminal(chain: LinearGaussianChain, alpha: float, lam: float, target: float) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``exp(r/alpha) p_pre(x_K)`` (a Gaussian times a Gaussian)."""
    mean, var = chain.terminal(*chain.pretrained())
    precision = 1 / var + 2 * lam / alpha
    return (mean / var + 2 * lam * target / alpha) / precision, 1 / precision


def affine_means(sampler, policy, num_steps: int | None = None) -> tuple[Tensor, Tensor]:
    """``(slopes, intercepts)`` of a sampler's transition means under an affine-in-x policy,
    read off at ``x = 0`` and ``x = 1`` (exact for an affine policy; a check for others)."""
    K = num_steps or sampler.num_steps
    x = torch.tensor([[0.0], [1.0]])
    slopes, intercepts = [], []
    for k in range(K):
        kk = torch.full((2,), k, dtype=torch.long)
        mean, _ = sampler.transition(x, kk, policy(x, sampler.times[kk], None))
        intercepts.append(mean[0, 0])
        slopes.append(mean[1, 0] - mean[0, 0])
    return torch.stack(slopes), torch.stack(intercepts)


def chain_of(sampler, pretrained, prior_var: float, prior_mean: float = 0.0) -> LinearGaussianChain:
    """The pretrained chain of a stochastic sampler under an affine pretrained policy."""
    A, c = affine_means(sampler, pretrained)
    var = _step_vars(sampler)
    return LinearGaussianChain(A.detach(), c.detach(), var, prior_mean, prior_var)


def _step_vars(sampler) -> Tensor:
    x = torch.zeros(1, 1)
    out = []
    for k in range(sampler.num_steps):
        kk = torch.full((1,), k, dtype=torch.long)
        _, std = sampler.transition(x, kk, torch.zeros_like(x))
        out.append(std[0] ** 2)
    return torch.stack(out)
