"""Continuous-time q-learning for reward-directed diffusion (Gao, Zha & Zhou 2024, Algorithm 1).

The problem (eq. 9): choose the action ``a`` (the score fed to the reverse dynamics) to
maximise ``E[beta h(Y_T) - int_0^T g^2/2 |a_t - grad log p_{T-t}(Y_t)|^2 dt]`` plus
``gamma`` times the entropy of the stochastic policy. Its Hamiltonian is quadratic in ``a``
with curvature ``-g^2``, so the optimal policy is Gaussian with covariance
``gamma / g^2 I`` (Proposition 1) and a learned mean ``mu_psi``; we start ``mu_psi`` from
the pretrained score network.

Consequences used below (derivations, since the extraction lost the formulas):

* q-function (28): for the normalised q of Jia & Zhou, ``q = gamma log pi``, so
  ``q_psi(t, y, a) = -g^2/2 |a - mu_psi(t, y)|^2 - gamma d / 2 log(2 pi gamma / g^2)``.
* running-reward signal (19): ``r = -g^2/2 |a - s_hat(T - t, y)|^2`` with ``s_hat`` the ratio
  estimator (18) over a fresh batch of data samples.
* the critic and actor updates, ``critic_target`` (both optimise ``V_theta`` and ``q_psi``
  jointly with Adam, as the paper's experiments do; states and actions are data, detached):

  - ``td`` (default; eqs. 29–30, "an actor–critic policy gradient method based on temporal
    difference"): the martingale orthogonality conditions with test functions
    ``dV/dtheta`` and ``dq/dpsi`` — stochastic approximation of
    ``E[sum_k test_k delta_k] = 0`` with the TD error
    ``delta_k = V(t_{k+1}, Y_{k+1}) + (r_k - q_k) dt - V(t_k, Y_k)``, ``V(T, .) = beta h``.
    As a loss (Remark 3's (31)): ``1/2 sum_k delta_k^2`` with the next state's value held
    constant (the semi-gradient), whose gradient is exactly that update;
  - ``monte_carlo``: the martingale loss ``1/2 sum_k dt (G_k - V_theta(t_k, Y_k))^2`` with
    ``G_k = beta h(Y_K) + sum_{j >= k} (r_j - q_j) dt`` — the same fixed point, with the
    whole future's noise in every target.

* the value function's form, ``critic_entropy``. ``r - q`` carries a deterministic term,
  the normalising constant of q: ``c(s) = gamma d / 2 log(2 pi gamma / g(s)^2)`` per unit
  time (about 14 on the Swiss roll, so ~70 over T = 5, against a terminal reward of at most
  ``beta``). Its share of the value, ``C(t_k) = sum_{j >= k} c(s_j) dt_j``, is known exactly
  on the grid, so with ``closed_form`` (default) ``V = C + V_theta`` and the network learns
  only the reward and score-matching parts: ``C(t_{k+1}) - C(t_k) + c(s_k) dt = 0``, so the
  TD error is the same number with the constant left out of the increments. This matters
  for TD: in expectation its actor moves the mean towards ``s_hat + grad_x V`` (the action
  shifts ``Y_{k+1}`` by ``g^2 a dt``), i.e. it follows the critic's x-gradient, and a
  network that must also fit the ~70-unit time profile has x-gradient errors that swamp
  the reward's. With ``learned`` (the network fits all of V) TD drives the policy off the
  data (measured, Table 4 setting, weight 2, 300 iterations: reward 0.02, KL(data) 2.47;
  with ``closed_form``: 0.84 / 0.68). For Monte-Carlo returns the critic is only a
  baseline, and ``closed_form`` makes it a better one.

The simulator is whichever sampler is configured (Euler–Maruyama = eq. 33, ODE-Euler and
DDIM = §7.1): the sampled action enters its transition in place of the score.

Evaluation, ``eval_actions``: ``mean`` (default) generates with the policy's mean
``mu_psi``, the exploratory formulation's averaged dynamics (the action noise adds
``g sqrt(gamma) dt`` per Euler–Maruyama step, whose total variance ``g^2 gamma T dt``
vanishes as ``dt -> 0``); ``sampled`` draws every action from ``pi``, as the paper's
simulator (33) generates its 300 samples. At ``dt = 0.1`` and ``gamma = 5`` that noise has
half the chain's own variance per step. A sampled-action chain has no path KL in the step
formula (each action would count as its step's mean, adding ``gamma d dt / 2`` per step of
pure exploration noise; under a deterministic sampler the KL is infinite), so it reports
none: its KL column is KL(data).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from ..backbones.mlp import MLPBackbone
from ..core.score_estimators import ratio_score
from .base import FineTuneMethod


class QLearning(FineTuneMethod):
    # the ratio score estimator and the value MLP read flat vectors; the policy's own noise
    # (temperature) makes it run under DDIM / the ODE too (the paper's Tables 5-6)
    sample_kinds = ("vectors",)

    def __init__(self, *args, reward_weight: float, temperature: float, delta: float,
                 data_samples: int = 300, value_lr: float = 1e-3, value_hidden: int = 64,
                 critic_target: str = "td", critic_entropy: str = "closed_form", eval_actions: str = "mean", **kw):
        super().__init__(*args, **kw)
        if eval_actions not in ("mean", "sampled"):
            raise ValueError(f"method.eval_actions must be mean or sampled (got {eval_actions!r})")
        self.eval_actions = eval_actions
        if critic_target not in ("td", "monte_carlo"):
            raise ValueError(f"method.critic_target must be td or monte_carlo (got {critic_target!r})")
        if critic_entropy not in ("closed_form", "learned"):
            raise ValueError(f"method.critic_entropy must be closed_form or learned (got {critic_entropy!r})")
        self.critic_target, self.critic_entropy = critic_target, critic_entropy
        if reward_weight < 0:
            raise ValueError(f"method.reward_weight must be >= 0 (got {reward_weight})")
        if temperature <= 0:
            raise ValueError(f"method.temperature must be > 0 (got {temperature})")
        if delta <= 0 or data_samples < 1:
            raise ValueError("method.delta must be > 0 and method.data_samples >= 1")
        if self.dataset is None:
            raise ValueError("q-learning needs the dataset (its ratio score estimator reads data samples)")
        self.reward_weight, self.temperature, self.delta = reward_weight, temperature, delta
        self.data_samples, self.value_lr = data_samples, value_lr
        dim = self.backbone.event_shape[0]
        self.value = MLPBackbone(dim, hidden=value_hidden, out_dim=1)

    def configure_optimizers(self):
        return [self.build_policy_optimizer(),
                torch.optim.Adam(self.value.parameters(), lr=self.value_lr)]

    def _action_std(self, s: Tensor) -> Tensor:
        return math.sqrt(self.temperature) / self.sampler.process.reverse_diffusion(s)

    def _policy(self, x: Tensor, s: Tensor, cond=None, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``a ~ N(mu_psi(t, x), gamma / g^2 I)`` (noise from ``generator``, default the
        training one)."""
        noise = torch.randn(x.shape, generator=generator or self.generator, device=x.device)
        return self.backbone(x, s, cond) + self._action_std(s).unsqueeze(-1) * noise

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond=None):
        if self.eval_actions == "mean":
            return super().generate(n, generator, cond)
        # the evaluation's generator draws the actions too, so eval.seed picks another
        # evaluation and the training generator's state is not touched
        return self.generate_with(partial(self._policy, generator=generator), n, generator, cond, path_kl=False)

    def critic_terms(self, traj) -> dict[str, Tensor]:
        """What the critic and actor losses read from one rollout (``[K, B]`` unless noted):
        the critic's ``value`` V_theta(t_k, Y_k), the ``increments`` ``(r_k - q_k) dt`` of the
        value the network learns (without the closed-form entropy part under
        ``critic_entropy=closed_form``), the ``terminal`` value ``beta h(Y_K)`` ``[B]``, the
        terminal ``rewards`` ``[B]`` and the ``running`` reward ``r_k``."""
        K, B = traj.num_steps, traj.final.shape[0]
        x = traj.states[:-1].flatten(0, 1)
        s = traj.times[:-1].repeat_interleave(B)
        a = traj.outputs.flatten(0, 1)
        g2 = self.sampler.process.reverse_diffusion(s) ** 2
        dt = (traj.times[:-1] - traj.times[1:]).unsqueeze(1)  # [K, 1]
        d = x.shape[-1]

        data = self.dataset.sample(self.data_samples, self.data_generator).to(x.device)
        score_hat = ratio_score(self.sampler.process, x, s, data, self.delta)
        running = (-0.5 * g2 * ((a - score_hat) ** 2).sum(-1)).reshape(K, B)
        # q = q_centred - c(s): the action-dependent part carries psi, the constant normalises
        # exp(q / gamma) over actions (q = gamma log pi)
        q_centred = (-0.5 * g2 * ((a - self.backbone(x, s)) ** 2).sum(-1)).reshape(K, B)
        increments = (running - q_centred) * dt
        if self.critic_entropy == "learned":
            entropy_rate = (0.5 * self.temperature * d * torch.log(2 * math.pi * self.temperature / g2)).reshape(K, B)
            increments = increments + entropy_rate * dt
        rewards = self.score_samples(traj.final)  # [B]
        return {"value": self.value(x, s).reshape(K, B), "increments": increments,
                "terminal": self.reward_weight * rewards, "rewards": rewards, "running": running, "dt": dt}

    def critic_loss(self, terms: dict[str, Tensor]) -> Tensor:
        value, increments, terminal = terms["value"], terms["increments"], terms["terminal"]
        if self.critic_target == "td":
            # the semi-gradient: the next state's value is a constant of step k's target
            next_value = torch.cat([value[1:].detach(), terminal.unsqueeze(0)])
            td_error = next_value + increments - value
            return 0.5 * (td_error**2).sum(0).mean()
        to_go = increments.flip(0).cumsum(0).flip(0)  # sum_{j >= k}
        target = terminal.unsqueeze(0) + to_go
        return 0.5 * ((target - value) ** 2 * terms["dt"]).sum(0).mean()

    def update(self) -> dict[str, float]:
        traj = self.rollout(self._policy)  # no gradient: states and actions are data
        terms = self.critic_terms(traj)
        loss = self.critic_loss(terms)
        opt_policy, opt_value = self.optimizers()
        opt_policy.zero_grad(set_to_none=True)
        opt_value.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_and_step(opt_policy)
        self.clip_and_step(opt_value)
        return {"critic_loss": loss, "reward": terms["rewards"].mean(), "kl_path": traj.path_kl().mean(),
                "running_reward": (terms["running"] * terms["dt"]).sum(0).mean()}
