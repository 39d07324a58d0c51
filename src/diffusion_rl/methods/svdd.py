"""SVDD: soft value-based decoding (Li et al. 2024, arXiv 2408.08252; public code masa-ue/SVDD;
METHODS_SPEC §2.3). Inference time, derivative-free: the pretrained network is never trained.

Each step, for every chain (core/particles.py ``best_of``):

1. draw ``M`` candidates ``y_m ~ p_pre(. | x_k)`` (the sampler's pretrained transition);
2. score them with a soft value at the *next* time, ``v_hat_{k+1}(y_m)``: ``value: tweedie``
   (SVDD-PM) ``r(x0_hat(y, s_{k+1}))`` with Tweedie's ``x0_hat = process.denoise``, or
   ``value: mc`` (SVDD-MC) a time-conditioned MLP regressed on ``r(x_K)`` of pretrained
   rollouts (``update()``; the alpha -> infinity "mean" form of the soft value, as the public
   code regresses it); at the last step the exact ``r``;
3. keep one: ``m ~ softmax_m(v_hat / alpha)`` (``selection: sample``) or ``argmax``
   (``selection: argmax``, the public code's default; alpha plays no part then).

With the exact ``v_{k+1}`` and ``M -> infinity``, step 3 samples ``p_pre(y|x) exp(v_{k+1}(y)/alpha)``
normalised, the optimal step of the KL-regularised problem, so the chain ends at the tilted
law ``exp(r/alpha) p_pre`` (up to the start's tilt); argmax tends to the reward's maximiser.

KL: the selected chain's path KL to the pretrained one has no closed form (each step's law
is a mixture over the candidates). ``generate`` reports ``kl_svdd = sum_k sum_m W_km log(M W_km)``
per sample (core/particles.py ``best_of``): the KL of the chain that records all candidates
and the choice to the pretrained chain (M i.i.d. draws, one kept uniformly), which bounds the
path KL from above and is tight as M grows (sampling); ``K log M`` for argmax. On the
Gaussian bed (exact value, 2000 chains): M = 10: 1.62 against a nested-Monte-Carlo path KL of
1.42; M = 256: 1.67 against 1.64 (the tilt's KL: 1.662). ``nfe = K M`` via :meth:`extra_metrics`.
Tests inject an exact soft value as ``value_fn``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.processes import check_tweedie
from ..core.particles import ParticleSampler, check_noisy_steps
from ..core.trajectory import Generation
from ..nets import TimeConditionedMLP
from .base import FineTuneMethod


class SVDD(FineTuneMethod):
    fine_tunes = False  # SVDD-MC trains a value network, never the backbone
    needs_stochastic_sampler = True

    def __init__(self, *args, kl_weight: float = 1.0, num_candidates: int = 10, value: str = "tweedie",
                 selection: str = "sample", value_hidden: Sequence[int] = (256, 256), time_dim: int = 32,
                 time_scale: float = 1000.0, activation: str = "silu", **kw):
        if value != "mc":
            kw["iterations"] = 0  # SVDD-PM: nothing to train (an experiment's budget is ignored)
        super().__init__(*args, **kw)
        for key, v, options in (("value", value, ("tweedie", "mc")), ("selection", selection, ("sample", "argmax"))):
            if v not in options:
                raise ValueError(f"method.{key} must be one of {', '.join(options)} (got {v!r})")
        if kl_weight <= 0:
            raise ValueError(f"method.kl_weight (alpha) must be > 0 (got {kl_weight})")
        if int(num_candidates) < 1:
            raise ValueError(f"method.num_candidates must be >= 1 (got {num_candidates})")
        check_noisy_steps(self.sampler, self.backbone.event_shape, "svdd")
        if value == "tweedie":
            check_tweedie(self.sampler.process, self.sampler.times, self.backbone.event_shape, "method.value=mc")
        elif self.sampler.num_steps < 2:
            raise ValueError("method.value=mc needs sampler.num_steps >= 2 (it values the intermediate states)")
        self.kl_weight, self.num_candidates = float(kl_weight), int(num_candidates)
        self.value, self.selection = value, selection
        if value == "mc":
            self.value_net = TimeConditionedMLP(self.backbone.event_shape, value_hidden, time_dim, time_scale, activation)
        #: ``value_fn(x, k) -> [B]``, a soft value at s_k replacing the configured one (exact values in tests)
        self.value_fn: Callable[[Tensor, int], Tensor] | None = None
        self.backbone.requires_grad_(False)

    # --- SVDD-MC: the value network ----------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.Adam(self.value_net.parameters(), lr=self.lr)

    def update(self) -> dict[str, float]:
        """One regression step of ``h(x_k, s_k)`` on ``r(x_K)`` over a fresh batch of pretrained
        chains, every intermediate step ``k = 1..K-1`` (the ones a candidate is valued at)."""
        traj = self.rollout(self.reference, with_reference=False)
        K, B = traj.num_steps, traj.final.shape[0]
        rewards = self.score_samples(traj.final).detach().to(traj.states.dtype)
        x = traj.states[1:K].flatten(0, 1)
        s = traj.times[1:K].repeat_interleave(B)
        loss = F.mse_loss(self.value_net(x, s), rewards.repeat(K - 1))
        self.optimiser_step(loss)
        return {"value_loss": loss.detach(), "reward": rewards.mean()}

    # --- decoding ----------------------------------------------------------------------------
    def soft_value(self, y: Tensor, k: int, cond=None) -> Tensor:
        """``v_hat_k(y)``: the exact reward at ``k = K``, else ``value_fn`` / Tweedie / the MLP."""
        if k == self.sampler.num_steps:
            return self.score_samples(y)
        if self.value_fn is not None:
            return self.value_fn(y, k)
        s = self.sampler.times.to(y.device)[k].expand(y.shape[0])
        if self.value == "mc":
            return self.value_net(y, s)
        return self.reward_of_state(self.sampler.process.denoise(y, s, self.reference(y, s, cond)))

    def log_score(self, y: Tensor, k: int, cond=None) -> Tensor:
        return self.soft_value(y, k, cond) / self.kl_weight

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond=None) -> Generation:
        if cond is None:
            cond = self.condition_source.sample(n, generator, generator.device, split="eval")
        loop = ParticleSampler(self.sampler, self.reference, self.backbone.event_shape, generator)
        x, kl = loop.best_of(n, self.num_candidates, self.log_score, cond=cond,
                             scheme="multinomial" if self.selection == "sample" else "argmax")
        return Generation(x, {"kl_svdd": kl})

    def extra_metrics(self) -> dict[str, float]:
        """Candidate values per sample (one network or value-net call each; Tweedie: K M)."""
        return {"nfe": float(self.sampler.num_steps * self.num_candidates)}
