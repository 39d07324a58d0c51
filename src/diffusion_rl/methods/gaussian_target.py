"""The closed-form targets of the Gaussian bench, as runs (``method=gaussian_target``).

On a linear-Gaussian pretrained chain (per-step affine score, ``backbone=affine_step``,
Euler–Maruyama) with a quadratic reward ``-lam (x - c)^2`` every KL-regularised method has
a closed-form destination (:mod:`diffusion_rl.evaluation.linear_gaussian`, METHODS_SPEC §0.3):

* ``fixed_variance``: the optimum of ``E r - alpha E[path KL]`` over chains that keep the
  sampler's variances (reward backprop, ELEGANT's drift, PPO + KL, RW-MLE, PCL, CTRL);
* ``myopic``: the equilibrium of a per-step KL gradient at fixed states (DPOK, soft PPO);
* ``tilted``: ``exp(r/alpha) p_pre`` of the pretrained chain's terminal law (SMC, SVDD with
  the exact value as M grows; the limit of the others as the steps shrink).

This "method" samples its target with the shared evaluation like any other row (the two
chains through the configured sampler, the tilt directly), and :meth:`extra_metrics` writes
the exact mean, variance, reward and KL the samples estimate, so a table can set every
method beside the number theory assigns it.
"""

from __future__ import annotations

import torch

from ..backbones.affine import AffineStepScore
from ..core.samplers import EulerMaruyama
from ..core.trajectory import Generation
from ..evaluation.linear_gaussian import chain_of, fixed_variance_optimum, myopic_kl_equilibrium, tilted_terminal
from .closed_form import ClosedFormTarget


class GaussianTarget(ClosedFormTarget):
    targets = ("fixed_variance", "myopic", "tilted")
    example_overrides = ("dataset=gaussian1d",)

    def __init__(self, *args, target: str = "fixed_variance", kl_weight: float = 1.0, **kw):
        super().__init__(*args, target=target, kl_weight=kl_weight, **kw)
        if not isinstance(self.backbone, AffineStepScore) or not isinstance(self.sampler, EulerMaruyama):
            raise ValueError("method=gaussian_target needs backbone=affine_step and sampler=euler_maruyama "
                             "(the closed forms hold for a linear-Gaussian chain)")
        self.require_quadratic_reward(1, "quadratic_two")
        _, prior_std = self.sampler.process.marginal_coeffs(torch.tensor(self.sampler.process.T))
        with torch.no_grad():
            self.chain = chain_of(self.sampler, self.reference, prior_var=float(prior_std) ** 2)
        lam, c = self.reward.scale, float(self.reward.target)
        solve = {"fixed_variance": fixed_variance_optimum, "myopic": myopic_kl_equilibrium}.get(target)
        self.means = None if solve is None else solve(self.chain, kl_weight, lam, c)
        # the target chain's policy, beside the untouched backbone: the sampler's transition is
        # affine in the score, so the optimal means give the optimal per-step score exactly
        self.target_policy = self.reference.frozen_reference()
        if self.means is not None:
            dscore = self._score_gain()
            with torch.no_grad():
                self.target_policy.a.add_((self.means[0] - self.chain.A) / dscore)
                self.target_policy.b.add_((self.means[1] - self.chain.c) / dscore)
        self._lam, self._c = lam, c

    def _score_gain(self) -> torch.Tensor:
        """``d mean_k / d score`` of each step (EM: ``g^2 dt``), read off the sampler."""
        x = torch.zeros(1, 1)
        gains = []
        for k in range(self.sampler.num_steps):
            kk = torch.full((1,), k, dtype=torch.long)
            m0, _ = self.sampler.transition(x, kk, torch.zeros_like(x))
            m1, _ = self.sampler.transition(x, kk, torch.ones_like(x))
            gains.append((m1 - m0)[0, 0])
        return torch.stack(gains)

    def exact(self) -> dict[str, float]:
        if self.means is not None:
            mean, var = self.chain.terminal(*self.means)
            reward = self.chain.expected_reward(*self.means, self._lam, self._c)
            kl = self.chain.path_kl(*self.means)
        else:
            mean, var = tilted_terminal(self.chain, self.kl_weight, self._lam, self._c)
            pre_mean, pre_var = self.chain.terminal(*self.chain.pretrained())
            kl = 0.5 * (var / pre_var + (mean - pre_mean) ** 2 / pre_var - 1 - torch.log(var / pre_var))
            reward = -self._lam * ((mean - self._c) ** 2 + var)
        mean, var, reward, kl = (float(v) for v in (mean, var, reward, kl))
        return {"exact_mean": mean, "exact_var": var, "exact_reward": reward, "exact_kl": kl,
                "exact_objective": reward - self.kl_weight * kl}

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond=None) -> Generation:
        if self.means is not None:  # the optimal chain itself, KL measured along it
            return super().generate(n, generator, cond)
        exact = self.exact()
        mean, var, kl = exact["exact_mean"], exact["exact_var"], exact["exact_kl"]
        x = mean + var**0.5 * torch.randn((n, 1), generator=generator, device=generator.device)
        return Generation(x, {"kl_exact": torch.full((n,), kl, device=x.device)})
