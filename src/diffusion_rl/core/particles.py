"""Particle loops over a sampler's chain: SMC with twists (TDS / DAS) and best-of-M candidate
selection (SVDD). Both propose with the sampler's own Gaussian transition and pick particles
by index along the batch, so they share the proposal, the resampling schemes and the gather.

Layout: ``G`` independent groups of ``N`` particles live in one batch of ``B = G N`` rows,
group-major (row ``g N + i`` is particle ``i`` of group ``g``); weights are ``[G, N]``.

Randomness: the chain noise and the resampling uniforms both come from the ``generator``
passed in (on the chain's device): the indices are drawn where the weights live, and a run
is a function of that one stream. A group of one particle draws no index at all, so
``N = 1`` (``M = 1``) reproduces :meth:`Sampler.rollout` draw for draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .conditioning import Cond, check_cond, index_cond
from .processes import _bcast
from .samplers import Policy, Sampler

SCHEMES = ("systematic", "multinomial", "argmax")


def log_mean_exp(log_w: Tensor, dim: int = -1) -> Tensor:
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def effective_sample_size(log_w: Tensor) -> Tensor:
    """``1 / sum_i W_i^2`` per group (``[G]`` from ``[G, N]``), computed in the log domain."""
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def resample(log_w: Tensor, num: int, scheme: str, generator: torch.Generator) -> Tensor:
    """``[G, num]`` indices into each group's ``N`` particles, drawn ``~ softmax(log_w)``.

    ``systematic``: one uniform per group, points ``(u + j) / num`` through the CDF (lowest
    variance; TDS); ``multinomial``: ``num`` i.i.d. draws (SVDD's TDS script); ``argmax``: the
    heaviest particle, no draw (SVDD's public default, DAS's output)."""
    G, N = log_w.shape
    if scheme == "argmax":
        return log_w.argmax(-1, keepdim=True).expand(G, num)
    W = torch.softmax(log_w, -1)
    if scheme == "multinomial":
        return torch.multinomial(W, num, replacement=True, generator=generator)
    if scheme != "systematic":
        raise ValueError(f"resampling scheme must be one of {', '.join(SCHEMES)} (got {scheme!r})")
    u = torch.rand((G, 1), generator=generator, device=log_w.device, dtype=W.dtype)
    points = (u + torch.arange(num, device=log_w.device, dtype=W.dtype)) / num
    return torch.searchsorted(W.cumsum(-1), points).clamp_max(N - 1)  # the clamp: cumsum's rounding


def _check_weights(log_w: Tensor, k: int) -> None:
    """A NaN, an infinite weight or a group without any weight left is no result: say why."""
    if bool(torch.isnan(log_w).any()) or not bool(torch.isfinite(log_w.max(-1).values).all()):
        raise FloatingPointError(
            f"SMC weights diverged at step {k} (non-finite log-weights): the twist r(x0_hat) / alpha is "
            "unbounded where Tweedie's x0_hat is poor (high noise: the network's error is divided by "
            "alpha(s)) and the twisted proposal follows its gradient; temper the twist "
            "(method.tempering_gamma, e.g. 0.008), raise method.kl_weight, or use method.proposal=bootstrap")


def flat_index(idx: Tensor, group_size: int) -> Tensor:
    """Rows of the flat batch for per-group indices ``[G, n]`` (group-major)."""
    return (idx + group_size * torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)).reshape(-1)


@dataclass
class ParticleRun:
    """One SMC run: final particles and weights per group, the evidence, the ESS trace."""

    states: Tensor  #: [G, N, *E] particles x_K
    log_weights: Tensor  #: [G, N] final log-weights (W = softmax)
    log_target: Tensor  #: [G, N] log psi_K(x_K) = r(x_K) / alpha
    log_z: Tensor  #: [G] log Z_hat, an unbiased estimate of E_pre[exp(r / alpha)] in exp
    ess: Tensor  #: [K, G] ESS / N at each step's resampling decision
    resampled: Tensor  #: [K, G] whether the group resampled at step k


class ParticleSampler:
    """Particles of ``sampler``'s chain under ``policy`` (the pretrained network)."""

    def __init__(self, sampler: Sampler, policy: Policy, event_shape: tuple[int, ...], generator: torch.Generator):
        self.sampler, self.policy, self.event_shape, self.generator = sampler, policy, tuple(event_shape), generator
        self.device = generator.device
        self.times = sampler.times.to(self.device)

    def _k(self, k: int, B: int) -> Tensor:
        return torch.full((B,), k, dtype=torch.long, device=self.device)

    def _transition(self, x: Tensor, k: int, out: Tensor) -> tuple[Tensor, Tensor]:
        """The sampler's step, with the rollout's rule for the last one: ``final_noise=false``
        returns its mean (std 0)."""
        mean, std = self.sampler.transition(x, self._k(k, x.shape[0]), out)
        if k == self.sampler.num_steps - 1 and not self.sampler.final_noise:
            std = torch.zeros_like(std)
        return mean, std

    def _noisy(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        # the rollout's own draw (shape, order) and formula: N = 1 stays bit for bit the rollout
        noise = torch.randn(mean.shape, generator=self.generator, device=self.device)
        return mean + _bcast(std, mean) * noise, noise

    # --- SMC -------------------------------------------------------------------------------
    def _twist(self, log_twist, x: Tensor, k: int, cond: Cond, grad: bool):
        """Network output, ``log psi_k(x)`` and (``grad``) its x-gradient through the network."""
        s = self.times[self._k(k, x.shape[0])]
        if not grad:
            out = self.policy(x, s, cond)
            return out, log_twist(x, k, out, cond), None
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = self.policy(xg, s, cond)
            lp = log_twist(xg, k, out, cond)
            g = torch.autograd.grad(lp.sum(), xg, allow_unused=True)[0] if lp.requires_grad else None
        return out.detach(), lp.detach(), torch.zeros_like(x) if g is None else g

    def log_increment(self, log_psi_next: Tensor, log_psi_now: Tensor, log_ratio: Tensor) -> Tensor:
        """``log [p_pre(x'|x) psi_{k+1}(x') / (q(x'|x) psi_k(x))]``: the weight of the move
        from the target ``p_pre psi_k`` to ``p_pre psi_{k+1}`` proposed by ``q``."""
        return log_ratio + log_psi_next - log_psi_now

    def smc(self, groups: int, particles: int, log_twist: Callable, log_target: Callable[[Tensor], Tensor], *,
            cond: Cond = None, twisted: bool = False, ess_threshold: float | None = None,
            scheme: str = "systematic") -> ParticleRun:
        """``log_twist(x, k, out, cond) -> [B]`` is ``log psi_k`` for ``k < K`` (``out`` = the
        network's output at ``(x, s_k)``); ``log_target(x_K) -> [B]`` is ``log psi_K``.
        ``twisted``: propose ``N(m_k + std_k^2 grad log psi_k, std_k^2)`` instead of ``N(m_k, std_k^2)``.
        ``ess_threshold``: resample a group when ``ESS < tau N`` (None: every step; 0: never)."""
        G, N, K = groups, particles, self.sampler.num_steps
        B = G * N
        check_cond(cond, G)
        cond = index_cond(cond, torch.arange(G, device=self.device).repeat_interleave(N))
        x = self.sampler.process.prior_sample((B, *self.event_shape), generator=self.generator, device=self.device)
        out, log_psi, grad = self._twist(log_twist, x, 0, cond, twisted)
        log_w = log_psi.reshape(G, N)  # x_0 ~ prior targets prior * psi_0
        log_z = torch.zeros(G, dtype=log_w.dtype, device=self.device)
        ess_trace, resampled = [], []
        for k in range(K):
            ess = effective_sample_size(log_w) / N
            do = torch.full((G,), N > 1 and ess_threshold != 0, device=self.device)
            if ess_threshold is not None:
                do &= ess < ess_threshold
            ess_trace.append(ess)
            resampled.append(do)
            if bool(do.any()):
                log_z = log_z + torch.where(do, log_mean_exp(log_w), torch.zeros_like(log_z))
                idx = resample(log_w, N, scheme, self.generator)
                idx = torch.where(do.unsqueeze(1), idx, torch.arange(N, device=self.device).expand(G, N))
                rows = flat_index(idx, N)
                x, out, log_psi, cond = x[rows], out[rows], log_psi[rows], index_cond(cond, rows)
                grad = None if grad is None else grad[rows]
                log_w = torch.where(do.unsqueeze(1), torch.zeros_like(log_w), log_w)
            mean, std = self._transition(x, k, out)
            # a deterministic step (the last one under sampler.final_noise=false) moves every
            # particle to its mean under the target and the proposal alike: no density ratio
            deterministic = not bool((std > 0).any())
            proposal_mean = mean if grad is None or deterministic else mean + _bcast(std**2, grad) * grad
            x_next, noise = self._noisy(proposal_mean, std)
            dims = tuple(range(1, x.dim()))
            # log N(x'; m, std^2) - log N(x'; m~, std^2); exactly 0 for the bootstrap proposal
            log_ratio = (0.5 * (noise**2).sum(dims) - ((x_next - mean) ** 2).sum(dims) / (2 * std**2)
                         if grad is not None and not deterministic else torch.zeros_like(log_psi))
            if k + 1 < K:
                out, log_psi_next, grad = self._twist(log_twist, x_next, k + 1, cond, twisted)
            else:
                log_psi_next = log_target(x_next)
            log_w = log_w + self.log_increment(log_psi_next, log_psi, log_ratio).reshape(G, N)
            _check_weights(log_w, k)
            x, log_psi = x_next, log_psi_next
        log_z = log_z + log_mean_exp(log_w)
        return ParticleRun(x.reshape(G, N, *self.event_shape), log_w, log_psi.reshape(G, N), log_z,
                           torch.stack(ess_trace), torch.stack(resampled))

    # --- best of M candidates (SVDD) -----------------------------------------------------
    def best_of(self, n: int, candidates: int, log_score: Callable, *, cond: Cond = None,
                scheme: str = "multinomial") -> tuple[Tensor, Tensor]:
        """At every step each chain draws ``M = candidates`` next states from the transition and
        keeps one, ``~ W = softmax(log_score)`` (``multinomial``) or the best (``argmax``, W one-hot).
        ``log_score(y, k_next, cond) -> [n M]`` scores the candidates for x_{k_next}.

        Returns the samples ``[n, *E]`` and ``[n]`` ``sum_k sum_m W_km log(M W_km)``: the KL of the
        chain that records every candidate and the choice to the same chain choosing uniformly
        (= M i.i.d. pretrained draws, one kept at random: the pretrained chain), estimated per
        step by its exact expectation over the choice given the candidates. By data processing
        it bounds the selected chain's path KL from above (in expectation); for sampling it is
        tight as M grows, for argmax it is ``K log M`` (the exact path KL is
        ``K (log M - 1 + 1/M)`` when the values have no ties)."""
        M, K = candidates, self.sampler.num_steps
        check_cond(cond, n)
        cond_m = index_cond(cond, torch.arange(n, device=self.device).repeat_interleave(M))
        x = self.sampler.process.prior_sample((n, *self.event_shape), generator=self.generator, device=self.device)
        kl = torch.zeros(n, dtype=x.dtype, device=self.device)
        for k in range(K):
            kk = self._k(k, n)
            mean, std = self._transition(x, k, self.policy(x, self.times[kk], cond))
            if M == 1 or not bool((std > 0).any()):
                # nothing to choose (no index drawn, no KL): one candidate, or a deterministic
                # step (sampler.final_noise=false) whose M candidates would all be the mean
                x, _ = self._noisy(mean, std)
                continue
            y, _ = self._noisy(mean.repeat_interleave(M, 0), std.repeat_interleave(M, 0))
            logits = log_score(y, k + 1, cond_m).reshape(n, M)
            idx = resample(logits, 1, scheme, self.generator)
            W = torch.softmax(logits, -1) if scheme != "argmax" else torch.zeros_like(logits).scatter_(1, idx, 1.0)
            kl = kl + torch.special.xlogy(W, W).sum(-1) + math.log(M)  # 0 log 0 = 0
            x = y[flat_index(idx, M)]
        return x, kl


def check_noisy_steps(sampler: Sampler, event_shape: tuple[int, ...], method: str) -> None:
    """Particle weights and candidate draws need a density at every step but the last: refuse
    ``std_k = 0`` before it. A deterministic last step (``sampler.final_noise=false``) is a
    fixed map of ``x_{K-1}`` under the target and the proposal alike: the loops move every
    particle to its mean there and weigh by ``psi_K`` of it."""
    if not sampler.stochastic:
        raise ValueError(f"method {method} needs a noisy transition at every step (a Gaussian density to reweight "
                         "or draw candidates from): use a stochastic sampler (sampler.eta > 0)")
    x = torch.zeros(1, *event_shape)
    for k in range(sampler.num_steps - (0 if sampler.final_noise else 1)):
        _, std = sampler.transition(x, torch.full((1,), k, dtype=torch.long), torch.zeros_like(x))
        if not bool((std > 0).all()):
            raise ValueError(f"method {method} needs a noisy transition at every step, but step {k} of "
                             f"{type(sampler).__name__} is deterministic (std 0): e.g. DDIM onto s = 0; use "
                             "sampler=euler_maruyama or a process with t_min > 0")
