"""Value-weighted sampling (Uehara et al. 2024 tutorial, §6.2, Alg. 4, eqs. 27-32; METHODS_SPEC §2.2).

Inference time: the pretrained network stays frozen. Sampling shifts the pretrained score by the
gradient of an estimate ``v_hat`` of the soft value ``v_k(x) = alpha log E_pre[exp(r(x_K)/alpha) | x_k = x]``:

    score(x, s_k) = s_pre(x, s_k) + grad_x v_hat(x, .) / alpha            (Alg. 4)

which on Euler-Maruyama is Alg. 4's mean shift ``sigma_k^2 grad v_hat / alpha`` (sigma_k^2 = g^2 dt =
d mean / d score); other prediction types go through ``process.from_score``. ``value_time``: v_hat at
s_k (Alg. 4 as written, ``current``) or at s_{k+1} (the expansion behind eq. 27, ``next``); both are
O(dt)-biased. The value estimators (``value``):

* ``mc`` (eq. 28): ``h_phi(x, s)`` regressed on pretrained rollouts at every state. ``target: exp``:
  ``(exp(h/a) - exp(r(x_K)/a))^2`` shifted by the running max ``M`` of r (same minimiser, no overflow);
  flat wherever exp(h/a) << exp(M/a), so it converges slowly (tests). ``log``: ``a e^{(r-h)/a} + h``,
  convex with the same minimiser (E[e^{(r-h)/a} | x] = 1; chosen here). ``mean``: r(x_K) itself
  (E[r | x_k], the alpha -> infinity form).
* ``soft_q`` (eq. 29, the lost alpha restored): fitted value iteration, target
  ``alpha log mean_m exp(V(y_m, s_{k+1}) / alpha)``, ``y_m ~ p_pre(. | x_k)``, ``V(., s_K) = r``, from a
  frozen copy of h refreshed every ``target_every`` iterations (``target_network``) or once per stage of
  a backward sweep k = K-1 .. 0 (``backward``: iterations // K per stage, rows k >= the stage's).
  Finite M biases it low (Jensen).
* ``tweedie`` (eqs. 30-31): ``v_hat = r(x0_hat(x, s))`` through the pretrained network (DPS-like); needs
  a differentiable r. Over-steers: on the Gaussian bed its gradient is (1 + 2 lam sigma_s^2 / alpha) times
  the exact one.
* ``path_integral`` (eq. 32, prefactor re-derived): ``p*_k(y|x) ∝ p_pre(y|x) exp(v_{k+1}(y)/alpha)`` has
  mean ``m_pre + sigma_k E_w[xi]``, ``w ∝ exp(r(x_K)/alpha)`` over pretrained continuations whose first
  noise is xi; so the score shift is ``sum_m w_m xi_m / sigma_k`` (the mean shift sigma_k sum w xi).
  This is the optimal step's mean, = sigma_k^2 J_m^{-T} grad v_k / alpha (not exactly Alg. 4's, O(dt)
  apart; ``value_time`` does not apply); black-box r. Cost K^2 M / 2 transitions per sample: vectors
  only. Its reported path KL uses the realised (noisy) means: by convexity an upper bound.

The wrapper is an ordinary policy: the default ``generate()`` rolls it out and the shared evaluation
reports its path KL to the pretrained chain as for any chain.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.conditioning import index_cond, repeat_cond
from ..core.processes import _bcast, check_tweedie
from ..nets import TimeConditionedMLP
from .base import FineTuneMethod

#: ``value_fn(x [B, *E], k [B] step indices 0..K, cond) -> [B]``, differentiable in x
ValueFn = Callable[[Tensor, Tensor, object], Tensor]


class ValueGuidedScore(nn.Module):
    """``reference(x, s) + grad_x v_hat(x, k or k + 1) / alpha`` in score space; output detached."""

    def __init__(self, reference: nn.Module, value_fn: ValueFn, alpha: float, process, times: Tensor,
                 value_time: str = "current"):
        super().__init__()
        self.reference, self.value_fn, self.alpha = reference, value_fn, float(alpha)
        self.process, self.times, self.offset = process, times, int(value_time == "next")

    def step_index(self, s: Tensor) -> Tensor:
        return (s.reshape(-1, 1) - self.times[:-1].to(s)).abs().argmin(1)

    def guidance(self, x: Tensor, k: Tensor, cond) -> Tensor:
        """``grad_x v_hat / alpha``, ``[B, *E]`` (under enable_grad: evaluation runs under no_grad)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.value_fn(xg, k + self.offset, cond).sum(), xg)
        return grad / self.alpha

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        out = self.reference(x, s, cond)
        score = self.process.to_score(x, s, out) + self.guidance(x, self.step_index(s), cond)
        return self.process.from_score(x, s, score).detach()


class PathIntegralScore(ValueGuidedScore):
    """Zeroth-order guidance: ``sum_m w_m xi_m / sigma_k`` from ``rollouts`` pretrained continuations."""

    def __init__(self, reference, sampler, reward_fn, alpha: float, rollouts: int, generator: torch.Generator):
        super().__init__(reference, None, alpha, sampler.process, sampler.times)
        self.sampler, self.reward_fn, self.rollouts, self.generator = sampler, reward_fn, int(rollouts), generator

    def guidance(self, x, k, cond):
        out = torch.zeros_like(x)
        for kk in k.unique().tolist():  # a rollout asks one step at a time; recompute_means may mix them
            rows = (k == kk).nonzero().squeeze(1)
            out[rows] = self._shift(x[rows], kk, index_cond(cond, rows))
        return out

    @torch.no_grad()
    def _shift(self, x: Tensor, k: int, cond) -> Tensor:
        M, B, K, sam = self.rollouts, x.shape[0], self.sampler.num_steps, self.sampler
        y, c, times = x.repeat(M, *([1] * (x.dim() - 1))), repeat_cond(cond, M), sam.times.to(x.device)
        for j in range(k, K):  # the pretrained chain from x_k, copy-major rows m B + b
            jj = torch.full((M * B,), j, dtype=torch.long, device=x.device)
            mean, std = sam.transition(y, jj, self.reference(y, times[jj], c))
            if (j == K - 1 and not sam.final_noise) or not sam.stochastic:
                std = torch.zeros_like(std)
            noise = torch.randn(y.shape, generator=self.generator, device=y.device)
            if j == k:
                first, sigma = noise, float(std[0])
            y = mean + _bcast(std, mean) * noise
        if sigma == 0:  # a deterministic step has no noise to reweight
            return torch.zeros_like(x)
        w = torch.softmax(self.reward_fn(y).reshape(M, B).to(x.dtype) / self.alpha, 0)
        return (_bcast(w, first.reshape(M, B, *x.shape[1:])) * first.reshape(M, B, *x.shape[1:])).sum(0) / sigma


def _exp_safe(a: Tensor, cap: float = 30.0) -> Tensor:
    """``exp(a)``, continued linearly above ``cap`` (a value far above the running max keeps a gradient)."""
    return torch.where(a < cap, torch.exp(a.clamp(max=cap)), math.exp(cap) * (1 + a - cap))


class ValueWeighted(FineTuneMethod):
    fine_tunes = False  # only the value network (mc, soft_q) trains

    reward_max: Tensor
    soft_q_step: Tensor

    def __init__(self, backbone, sampler, reward, *, kl_weight: float = 1.0, value: str = "mc",
                 value_time: str = "current", target: str = "exp", soft_q_samples: int = 16,
                 soft_q_schedule: str = "target_network", target_every: int = 50, path_integral_rollouts: int = 64,
                 value_lr: float = 1e-3, value_hidden: Sequence[int] = (256, 256), time_dim: int = 32,
                 time_scale: float = 1000.0, activation: str = "silu", **kw):
        for key, v, options in (("value", value, ("mc", "soft_q", "tweedie", "path_integral")),
                                ("value_time", value_time, ("current", "next")), ("target", target, ("exp", "log", "mean")),
                                ("soft_q_schedule", soft_q_schedule, ("target_network", "backward"))):
            if v not in options:
                raise ValueError(f"method.{key} must be one of {', '.join(options)} (got {v!r})")
        # Tweedie differentiates r(x0_hat); the path integral reweights the transition's noise
        self.needs_differentiable_reward = value == "tweedie"
        self.needs_stochastic_sampler = value == "path_integral"
        if self.needs_differentiable_reward and not getattr(reward, "differentiable", False):
            raise ValueError(f"method.value=tweedie differentiates r(x0_hat), but {type(reward).__name__} is not "
                             "differentiable: use method.value=mc, soft_q or path_integral")
        if self.needs_stochastic_sampler and not sampler.stochastic:
            raise ValueError(f"method.value=path_integral reweights the transition noise, but {type(sampler).__name__} "
                             "is deterministic here (use sampler=euler_maruyama, or sampler=ddim sampler.eta=1.0)")
        if value in ("tweedie", "path_integral"):
            kw["iterations"] = 0  # nothing to train (an experiment's budget is ignored)
        super().__init__(backbone, sampler, reward, **kw)
        if kl_weight <= 0:
            raise ValueError(f"method.kl_weight (alpha) must be > 0 (got {kl_weight})")
        for key, v in (("soft_q_samples", soft_q_samples), ("target_every", target_every),
                       ("path_integral_rollouts", path_integral_rollouts)):
            if int(v) < 1:
                raise ValueError(f"method.{key} must be >= 1 (got {v})")
        if value_lr <= 0:
            raise ValueError(f"method.value_lr must be > 0 (got {value_lr})")
        K = self.sampler.num_steps
        if value == "soft_q" and soft_q_schedule == "backward" and self.iterations < K:
            raise ValueError(f"method.soft_q_schedule=backward needs method.iterations >= sampler.num_steps={K} "
                             f"(one stage per step; got {self.iterations})")
        if value == "tweedie":
            check_tweedie(self.sampler.process, self.sampler.times, self.backbone.event_shape, "method.value=mc")
        self.alpha, self.value, self.value_time, self.target = float(kl_weight), value, value_time, target
        self.soft_q_samples, self.soft_q_schedule, self.target_every = int(soft_q_samples), soft_q_schedule, int(target_every)
        self.path_integral_rollouts, self.value_lr = int(path_integral_rollouts), float(value_lr)
        if value in ("mc", "soft_q"):
            self.value_net = TimeConditionedMLP(self.backbone.event_shape, value_hidden, time_dim, time_scale, activation)
        if value == "soft_q":  # the frozen copy V: a submodule, so a checkpoint resumes it
            self.target_net = copy.deepcopy(self.value_net).requires_grad_(False)
        self.register_buffer("reward_max", torch.tensor(float("-inf")))  # the exp target's running shift M
        self.register_buffer("soft_q_step", torch.tensor(0))  # soft-Q iterations done (target refreshes)
        #: ``value_fn(x, k, cond) -> [B]`` replacing the configured estimator (exact values in tests)
        self.value_fn: ValueFn | None = None
        self._eval_generator: torch.Generator | None = None
        self.backbone.requires_grad_(False)

    # --- the value -------------------------------------------------------------------------------
    def value_estimate(self, x: Tensor, k: Tensor, cond=None) -> Tensor:
        """``v_hat(x, s_k)`` for per-row step indices ``k`` in 0..K (K: the reward, when differentiable)."""
        if self.value_fn is not None:
            return self.value_fn(x, k, cond)
        s = self.sampler.times.to(x.device)[k]
        if self.value == "tweedie":
            est = self.reward_of_state(self.sampler.process.denoise(x, s, self.reference(x, s, cond)))
        else:
            est = self.value_net(x, s)
        last = k == self.sampler.num_steps
        if getattr(self.reward, "differentiable", False) and bool(last.any()):
            exact = self.reward_of_state(x).to(est.dtype)
            est = exact if bool(last.all()) else torch.where(last, exact, est)
        return est

    def eval_policy(self) -> ValueGuidedScore:
        if self.value == "path_integral" and self.value_fn is None:
            return PathIntegralScore(self.reference, self.sampler, self.score_samples, self.alpha,
                                     self.path_integral_rollouts, self._eval_generator or self.generator)
        return ValueGuidedScore(self.reference, self.value_estimate, self.alpha, self.sampler.process,
                                self.sampler.times, self.value_time)

    @torch.no_grad()
    def generate(self, n, generator, cond=None):
        self._eval_generator = generator  # the path integral's continuations draw from the evaluation's stream
        try:
            return super().generate(n, generator, cond)
        finally:
            self._eval_generator = None

    # --- training (mc, soft_q) --------------------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.Adam(self.value_net.parameters(), lr=self.value_lr)

    def update(self) -> dict[str, float]:
        traj = self.rollout(self.reference, with_reference=False)  # pretrained roll-in and continuation
        K, B = traj.num_steps, traj.final.shape[0]
        r = self.score_samples(traj.final).detach().to(traj.states.dtype)
        x, s = traj.states.detach().flatten(0, 1), traj.times.repeat_interleave(B)  # every state, k = 0..K
        h = self.value_net(x, s).reshape(K + 1, B)
        if self.value == "soft_q":
            return self._soft_q_step(traj, h, r)
        # summed over k, averaged over chains (Adam does not mind the scale; SGD's step per k is then fixed)
        if self.target == "mean":
            loss = ((h - r) ** 2).mean(1).sum()
        elif self.target == "log":
            loss = (_exp_safe((r - h) / self.alpha) + h / self.alpha).mean(1).sum()
        else:
            self.reward_max.fill_(max(float(self.reward_max), float(r.max())))
            M = self.reward_max.to(r.dtype)
            loss = ((_exp_safe((h - M) / self.alpha) - torch.exp((r - M) / self.alpha)) ** 2).mean(1).sum()
        self.optimiser_step(loss)
        return {"value_loss": loss.detach(), "reward": r.mean()}

    def _soft_q_step(self, traj, h: Tensor, r: Tensor) -> dict[str, float]:
        K, B, Mq, step = traj.num_steps, r.shape[0], self.soft_q_samples, int(self.soft_q_step)
        every = self.iterations // K if self.soft_q_schedule == "backward" else self.target_every
        if step % every == 0:
            self.target_net = copy.deepcopy(self.value_net).requires_grad_(False)
        # backward sweep: stage j trains the steps k >= K - 1 - j (the later ones keep their fit)
        lo = max(K - 1 - step // every, 0) if self.soft_q_schedule == "backward" else 0
        with torch.no_grad():  # targets for k = lo..K-1 from M draws y of the pretrained transition
            means, stds = traj.means[lo:], _bcast(traj.stds[lo:], traj.means[lo:])
            y = means + stds * torch.randn((Mq, *means.shape), generator=self.generator, device=r.device)
            n = K - lo  # y: [M, n, B, *E]; V(., s_{k+1}) from the frozen copy, V(., s_K) = r (maybe black-box)
            v_next = torch.cat([
                self.target_net(y[:, :n - 1].flatten(0, 2), traj.times[lo + 1:K].repeat_interleave(B).repeat(Mq))
                .reshape(Mq, n - 1, B),
                self.score_samples(y[:, n - 1].flatten(0, 1)).to(r.dtype).reshape(Mq, 1, B)], 1)
            targets = self.alpha * (torch.logsumexp(v_next / self.alpha, 0) - math.log(Mq))  # log-mean-exp
            targets = torch.cat([targets, r.unsqueeze(0)])  # h(x_K, s_K) = r(x_K)
        loss = ((h[lo:] - targets) ** 2).mean(1).sum()
        self.optimiser_step(loss)
        self.soft_q_step += 1
        return {"value_loss": loss.detach(), "reward": r.mean()}


class ValueWeightedTweedie(ValueWeighted):
    """``value: tweedie`` as a class of its own: its class-level flag (read by tests) says it differentiates r."""

    needs_differentiable_reward = True


class ValueWeightedPathIntegral(ValueWeighted):
    """``value: path_integral`` as a class of its own: its class-level flags say it needs a noisy
    sampler and, at K^2 M / 2 transitions per sample, vectors only (GFP smoke: 5.5 min for 64 samples)."""

    needs_stochastic_sampler = True
    sample_kinds = ("vectors",)
