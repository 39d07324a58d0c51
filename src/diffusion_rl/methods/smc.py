"""SMC guidance: sequential Monte Carlo on the pretrained chain for ``p ∝ exp(r / alpha) p_pre``
(TDS: Wu et al. 2023, arXiv 2306.17775; DAS: Kim, Kim & Park, ICLR 2025; METHODS_SPEC §2.8).

Inference only: the pretrained network is never trained. The target path law is
``p_pre(x_{0:K}) exp(r(x_K) / alpha)``; its intermediate targets are ``p_pre(x_{0:k}) psi_k(x_k)``
with the twist ``log psi_k(x) = lambda_k r(x0_hat(x, s_k)) / alpha`` (Tweedie's
``x0_hat = process.denoise(x, s_k, pretrained output)``, an estimate of ``v_k / alpha``),
tempering ``lambda_k = min((1 + gamma)^k - 1, 1)`` (DAS) or 1 (TDS), and ``psi_K = exp(r / alpha)``
exactly. Each step (core/particles.py): resample a group when ``ESS < tau N``
(``log Z_hat += logmeanexp(log w)``, weights reset), propose ``x' ~ q`` and reweight

    log w += log p_pre(x'|x) - log q(x'|x) + log psi_{k+1}(x') - log psi_k(x)

with ``q`` the pretrained transition (``bootstrap``; the first two terms cancel) or
``N(m_k + std_k^2 grad log psi_k(x), std_k^2)`` (``twisted``; gradient through the network
and the reward). At the end ``log Z_hat += logmeanexp(log w)``: ``Z_hat`` is unbiased for
``Z = E_pre[exp(r(x_K) / alpha)]`` (any twist, any resampling schedule).

Design: ``generate(n)`` runs ``n`` independent groups of ``num_particles`` and returns one
particle per group drawn ``~ W`` (``output: argmax`` keeps the heaviest, DAS's choice: not the
alpha-target), so the ``n`` samples are independent and the cost is ``n N K`` network calls.
The per-sample ``kl_smc = sum_i W_i r(x_i) / alpha - log Z_hat`` of its group (the draw's
expectation of ``r(x) / alpha - log Z_hat``) estimates ``KL(p_r ‖ p_pre) = E_pr[r]/alpha - log Z``
of the *target* (exact in the limit; ``E log Z_hat <= log Z`` biases it up at small N; a
batch can come out below 0 where the KL is near 0); the path KL of a resampled genealogy is
not defined. ``log_Z``, ``kl_smc``, the ESS and the resampling rate reach metrics.json through
:meth:`extra_metrics`. Tests inject an exact soft value as ``value_fn``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..core.particles import SCHEMES, ParticleRun, ParticleSampler, check_noisy_steps, flat_index, resample
from ..core.trajectory import Generation
from .base import FineTuneMethod


class SMC(FineTuneMethod):
    fine_tunes = False
    needs_stochastic_sampler = True
    #: the particle loop (a test swaps in a wrong weight rule to show the tests catch it)
    loop_cls = ParticleSampler

    def __init__(self, *args, kl_weight: float = 1.0, num_particles: int = 4, proposal: str = "bootstrap",
                 twist: str = "tweedie", ess_threshold: float | None = 0.5, resample_scheme: str = "systematic",
                 output: str = "sample", tempering_gamma: float | None = None, **kw):
        kw["iterations"] = 0  # inference only: nothing to train (an experiment's budget is ignored)
        super().__init__(*args, **kw)
        # the twisted proposal differentiates the reward; the bootstrap one only evaluates it
        self.needs_differentiable_reward = proposal == "twisted"
        if self.needs_differentiable_reward and not getattr(self.reward, "differentiable", False):
            raise ValueError(f"method.proposal=twisted differentiates the reward, but {type(self.reward).__name__} "
                             "is not differentiable: use method.proposal=bootstrap")
        for key, value, options in (("proposal", proposal, ("bootstrap", "twisted")), ("twist", twist, ("tweedie",)),
                                    ("resample_scheme", resample_scheme, SCHEMES[:2]),
                                    ("output", output, ("sample", "argmax"))):
            if value not in options:
                raise ValueError(f"method.{key} must be one of {', '.join(options)} (got {value!r})")
        if kl_weight <= 0:
            raise ValueError(f"method.kl_weight (alpha) must be > 0 (got {kl_weight})")
        if int(num_particles) < 1:
            raise ValueError(f"method.num_particles must be >= 1 (got {num_particles})")
        if ess_threshold is not None and not 0 <= ess_threshold <= 1:
            raise ValueError(f"method.ess_threshold must be null or in [0, 1] (got {ess_threshold})")
        if tempering_gamma is not None and tempering_gamma <= 0:
            raise ValueError(f"method.tempering_gamma must be null or > 0 (got {tempering_gamma})")
        check_noisy_steps(self.sampler, self.backbone.event_shape, "smc")
        try:  # the Tweedie twist needs an x0 estimate from the network's output
            x = torch.zeros(1, *self.backbone.event_shape)
            self.sampler.process.denoise(x, self.sampler.times[:1], x)
        except ValueError as e:
            raise ValueError(f"method.twist=tweedie: {e}") from None
        self.kl_weight, self.num_particles, self.proposal = float(kl_weight), int(num_particles), proposal
        self.ess_threshold, self.resample_scheme, self.output = ess_threshold, resample_scheme, output
        self.tempering_gamma = tempering_gamma
        #: ``value_fn(x, k) -> [B]``, a soft value estimate at s_k replacing Tweedie's (exact twists in tests)
        self.value_fn: Callable[[Tensor, int], Tensor] | None = None
        self.backbone.requires_grad_(False)
        self._stats: dict[str, float] = {}

    def update(self):  # pragma: no cover - never called with 0 iterations
        raise RuntimeError("SMC samples at inference time: nothing is trained")

    # --- the twists ------------------------------------------------------------------------
    def tempering(self, k: int) -> float:
        return 1.0 if self.tempering_gamma is None else min((1 + self.tempering_gamma) ** k - 1, 1.0)

    def log_twist(self, x: Tensor, k: int, out: Tensor, cond=None) -> Tensor:
        """``log psi_k(x) = lambda_k v_hat_k(x) / alpha``; ``v_hat = r(x0_hat)`` unless ``value_fn``."""
        if self.value_fn is not None:
            value = self.value_fn(x, k)
        else:
            s = self.sampler.times.to(x.device)[k].expand(x.shape[0])
            value = self.reward_of_state(self.sampler.process.denoise(x, s, out))  # relaxed state, as reward backprop
        return self.tempering(k) * value / self.kl_weight

    def log_target(self, x: Tensor) -> Tensor:
        return self.score_samples(x) / self.kl_weight  # psi_K: the reward the evaluation reads

    # --- sampling ----------------------------------------------------------------------------
    def particles(self, groups: int, generator: torch.Generator, cond=None) -> ParticleRun:
        loop = self.loop_cls(self.sampler, self.reference, self.backbone.event_shape, generator)
        return loop.smc(groups, self.num_particles, self.log_twist, self.log_target, cond=cond,
                        twisted=self.proposal == "twisted", ess_threshold=self.ess_threshold,
                        scheme=self.resample_scheme)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond=None) -> Generation:
        if cond is None:
            cond = self.condition_source.sample(n, generator, generator.device, split="eval")
        run = self.particles(n, generator, cond)
        N = self.num_particles
        if N == 1:  # no draw: N = 1 with the bootstrap proposal is the pretrained sampler
            pick = torch.zeros((n, 1), dtype=torch.long, device=generator.device)
        else:
            pick = resample(run.log_weights, 1, "argmax" if self.output == "argmax" else "multinomial", generator)
        rows = flat_index(pick, N)
        # E_W[r] / alpha - log Z_hat of the sample's group: the mean over the draw ~ W of
        # r(x) / alpha - log Z_hat (same expectation, less noise)
        kl = (torch.softmax(run.log_weights, -1) * run.log_target).sum(-1) - run.log_z
        self._accumulate(n, run, kl)
        return Generation(run.states.flatten(0, 1)[rows], {"kl_smc": kl})

    def _accumulate(self, n: int, run: ParticleRun, kl: Tensor) -> None:
        s = self._stats
        for key, total in (("log_Z", run.log_z.sum()), ("kl_smc", kl.sum()), ("ess_fraction", run.ess.mean(0).sum()),
                           ("resample_rate", run.resampled.double().mean(0).sum())):
            s[key] = s.get(key, 0.0) + float(total)
        s["groups"] = s.get("groups", 0) + n

    def extra_metrics(self) -> dict[str, float]:
        """Means over every group generated: ``log_Z`` (-> log E_pre[exp(r/alpha)]), ``kl_smc``,
        the ESS / N before each step's resampling decision, the fraction of steps resampled, and
        the network evaluations per sample (``nfe``; the twisted proposal adds as many backwards)."""
        if not self._stats:
            return {}
        out = {k: v / self._stats["groups"] for k, v in self._stats.items() if k != "groups"}
        return {**out, "nfe": float(self.num_particles * self.sampler.num_steps)}


class TwistedSMC(SMC):
    """SMC with the twisted proposal (``conf/method/smc_twisted.yaml``): a class of its own so
    that its class-level flag, which tests read, says it differentiates the reward (SMC
    sets the same flag per instance from ``proposal``, which is what the CLI evaluates).

    The proposal is a gradient step of size ``std_k^2`` on ``log psi_k``: stable while
    ``std_k^2`` times the twist's curvature stays below 2 (fine grids). On coarse grids it
    overshoots (debug=smoke's 4 steps on gmm1d: Delta = 1.25, curvature 2 / alpha): the
    weights stay exact in principle, but no particle lands where the target has its mass."""

    needs_differentiable_reward = True
