"""CTRL, "score as action" (Zhao, Chen, Zhang, Yao & Tang, ICML 2025): continuous-time PPO with
a structured critic and a closed-form first-order advantage (METHODS_SPEC §2.7; only the
reviews survive, so every formula here is reconstructed and said so in conf/method/ctrl.yaml).

Per iteration: roll out; fit the critic ``V_phi`` to the Monte-Carlo returns
``G_k = w r(x_K) - alpha sum_{j>=k} KL_j`` (MSE at every ``(x_k, s_k)``; own Adam, ``value_lr``);
advantages ``Â_kΔ_k = <grad_x V_phi(x, s_{k+1})|_{x = m_k}, x_{k+1} - m_k>`` (the reviews'
"closed-form advantage rate": the action-free part of the generator is the baseline, so no next-
state query); then PPO steps on the clipped surrogate plus ``alpha`` times DPOK's direct KL.

Critic (their eq. 20): ``V(x, s) = c_skip(s) w r(x̂_0(x, s)) + c_out(s) NN_phi(x, s)``, ``x̂_0``
Tweedie's estimate under the current policy (its parameters detached, differentiable in x),
``c_skip = cos(pi tau / 2)``, ``c_out = sin(pi tau / 2)``, ``tau = (s - t_min)/(T - t_min)``, so
``V(x, t_min) = w r(x)`` exactly. It needs ``grad r``: a black-box reward is refused (the CLI's
differentiable-reward check); ``method=ctrl_plain_critic`` (``NN_phi`` alone) runs with one.

Which optimum (derived). ``J = E[w r(x_K) - alpha sum_k KL_k(theta; x_k)]`` has the gradient
``E sum_k [grad log pi_k(x_{k+1}|x_k) (w r - alpha sum_{j>k} KL_j) - alpha grad_theta KL_k]`` (the
state dependence of later KLs is in the score term). Given ``x_{k+1}``, the bracket's mean is the
on-policy value ``V_{k+1}(x_{k+1})`` of the target *with* the future KL (what ``G_{k+1}``
regresses); ``KL_k(x_k)`` in ``G_k`` and the baseline ``E[V_{k+1}|x_k]`` have zero-mean score
terms. So with the true ``V``, ``E[grad log pi_k A_k] - alpha grad KL_k`` *is* ``grad J``, and the
fixed points are the fixed-variance optimum. First order: for ``pi_k = N(m_k, sigma_k^2)``,
``E[grad log pi_k Â_k] = (d m_k/d theta) grad V(m_k)`` against the exact
``(d m_k/d theta) E[grad V(m_k + sigma_k xi)]`` (Stein): equal when ``V`` is quadratic (the
dropped ``-q sigma^2 (xi^2 - 1)`` is uncorrelated with ``xi``; the Gaussian bed, where every
affine policy's value is quadratic), ``O(sigma_k^2 grad^3 V)`` otherwise (gone as the step
shrinks). With ``critic_target: reward_only`` (``G_k = w r``) the estimator is DPOK's in
expectation: the myopic-KL equilibrium (the negative control of tests/test_closed_form_ctrl.py).
What remains is the critic's error: a wrong ``grad_x V_phi`` moves the fixed point (measured on
the bed at 400 iterations: structured -0.01 in the terminal mean, plain critic -0.05), and
``grad_point: state`` reads ``grad V_k(x_k)`` (this step's KL included, at the wrong point), an
``O(step)`` bias: -0.17 with 5 steps, i.e. about DPOK's equilibrium.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..core.conditioning import repeat_cond
from ..core.trajectory import Trajectory
from ..nets import TimeConditionedMLP
from .policy_gradient import PolicyGradientMethod

CHOICES = {"critic": ("structured", "plain"), "link": ("sincos", "linear"), "grad_point": ("mean", "state"),
           "critic_target": ("kl_to_go", "reward_only")}


class CTRL(PolicyGradientMethod):
    needs_differentiable_reward = True  # the structured critic's grad_x r(x̂_0)
    groups_advantages = False  # its advantages come from the critic, not from a reward baseline

    def __init__(self, *args, kl_weight: float = 1.0, critic: str = "structured", link: str = "sincos",
                 grad_point: str = "mean", critic_target: str = "kl_to_go", critic_epochs: int = 1,
                 value_lr: float = 1e-3, value_hidden: Sequence[int] = (64, 64), value_time_dim: int = 16,
                 value_time_scale: float | None = None, denoiser: str = "pretrained", **kw):
        kw.setdefault("normalize_advantages", False)
        super().__init__(*args, **kw)
        for key, v in (("critic", critic), ("link", link), ("grad_point", grad_point), ("critic_target", critic_target)):
            if v not in CHOICES[key]:
                raise ValueError(f"method.{key} must be one of {'|'.join(CHOICES[key])} (got {v!r})")
        if denoiser not in ("policy", "pretrained"):
            raise ValueError(f"method.denoiser must be policy or pretrained (got {denoiser!r})")
        self.denoiser = denoiser
        if kl_weight < 0 or critic_epochs < 0 or value_lr <= 0:
            raise ValueError("method.kl_weight >= 0, method.critic_epochs >= 0 and method.value_lr > 0 required")
        self.kl_weight, self.critic_kind, self.link, self.grad_point = kl_weight, critic, link, grad_point
        self.critic_target, self.critic_epochs, self.value_lr = critic_target, int(critic_epochs), value_lr
        self._t_end = float(self.sampler.times[-1])  # s_K: where V := w r exactly
        self._span = float(self.sampler.times[0]) - self._t_end
        if value_time_scale is not None and value_time_scale <= 0:
            raise ValueError(f"method.value_time_scale must be > 0 or null (got {value_time_scale})")
        # time features of value_time_scale * s; default: the sampler's span onto [0, 1000] (DDPM's
        # step range). Features of s itself (OU: time_scale 1) blurred neighbouring steps on the
        # test bed: critic gradients off by 2x, terminal mean 1.56-1.58 against 1.597 (measured)
        self.critic = TimeConditionedMLP(self.backbone.event_shape, value_hidden, value_time_dim,
                                         value_time_scale or 1000.0 / self._span)
        self._scale, self._logs = 1.0, {}

    # --- the critic ---------------------------------------------------------------------------
    def configure_optimizers(self):
        return [self.build_policy_optimizer(),
                torch.optim.Adam(self.critic.parameters(), lr=self.value_lr)]

    def policy_optimizer(self):
        return self.optimizers()[0]

    def coefficients(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)``: 1 and 0 at the data end, 0 and 1 at the noise end."""
        tau = ((s - self._t_end) / self._span).clamp(0, 1)
        if self.link == "linear":
            return 1 - tau, tau
        return torch.cos(0.5 * math.pi * tau), torch.sin(0.5 * math.pi * tau)

    def skip_term(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        """``c_skip(s) w r(x̂_0(x, s))`` ``[N]``, differentiable in ``x`` only (the policy's
        parameters are not among autograd.grad's inputs and the term is detached for the fit)."""
        if self.critic_kind == "plain":
            return x.new_zeros(x.shape[0])
        c_skip, _ = self.coefficients(s)
        # Tweedie divides the network's error by alpha(s) (e^-5 at the OU's T = 5): with the
        # policy's score a drifting early step moves x0_hat by e^s times its change
        denoiser = self.reference if self.denoiser == "pretrained" else self.backbone
        x0 = self.sampler.process.denoise(x, s, denoiser(x, s, cond))
        end = (s <= self._t_end).reshape(-1, *([1] * (x.dim() - 1)))
        x0 = torch.where(end, x, x0)  # V(x, s_K) = w r(x) exactly, also where t_min > 0 (VP)
        return c_skip * self.reward_weight * self.reward_of_state(x0)

    def value(self, x: Tensor, s: Tensor, cond=None, skip: Tensor | None = None) -> Tensor:
        """``V_phi(x, s)`` ``[N]`` for states ``x [N, *E]`` at times ``s [N]``."""
        skip = self.skip_term(x, s, cond) if skip is None else skip
        if self.critic_kind == "plain":
            return self.critic(x, s)
        return skip + self.coefficients(s)[1] * self.critic(x, s)

    def returns(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        """``[K+1, B]`` Monte-Carlo targets ``G_k`` of ``V(x_k, s_k)`` (``G_K = w r``)."""
        G = (self.reward_weight * rewards).unsqueeze(0).expand(traj.num_steps + 1, -1)
        if self.critic_target == "reward_only":
            return G.detach()
        kl = traj.kl.detach()
        to_go = torch.cat([kl.flip(0).cumsum(0).flip(0), kl.new_zeros(1, kl.shape[1])])  # sum_{j >= k}
        return (G - self.kl_weight * to_go).detach()

    def fit_critic(self, traj: Trajectory, G: Tensor) -> Tensor:
        """``critic_epochs`` full-batch Adam steps on the MSE against ``G``; returns the MSE before
        the last step (the first one's without steps)."""
        K1, B = G.shape
        x = traj.states.detach().flatten(0, 1)
        s = traj.times.repeat_interleave(B)
        cond = repeat_cond(traj.cond, K1)
        with torch.no_grad():
            skip = self.skip_term(x, s, cond)  # constant in phi: once per rollout
        opt = self.optimizers()[1]
        for epoch in range(max(self.critic_epochs, 1)):
            mse = ((self.value(x, s, skip=skip) - G.flatten()) ** 2).mean()
            if self.critic_epochs:
                self.optimiser_step(mse, opt)
        return mse.detach()

    # --- the advantage --------------------------------------------------------------------------
    def first_order_advantages(self, traj: Trajectory, value: Callable | None = None) -> Tensor:
        """``[K, B]`` ``<grad_x V(x, s), x_{k+1} - m_k>`` at ``(m_k, s_{k+1})`` (``grad_point:
        mean``) or ``(x_k, s_k)`` (``state``); ``value(x, s, cond) -> [N]`` defaults to ``V_phi``."""
        value = value or self.value
        K, B = traj.num_steps, traj.states.shape[1]
        mean = self.grad_point == "mean"
        points, times = (traj.means, traj.times[1:]) if mean else (traj.states[:-1], traj.times[:-1])
        chunk = self.steps_per_backward or K
        grads = []
        with torch.enable_grad():
            for start in range(0, K, chunk):
                stop = min(start + chunk, K)
                x = points[start:stop].detach().flatten(0, 1).requires_grad_(True)
                s = times[start:stop].repeat_interleave(B)
                (g,) = torch.autograd.grad(value(x, s, repeat_cond(traj.cond, stop - start)).sum(), x)
                grads.append(g.reshape(stop - start, *traj.means.shape[1:]))
        step = traj.states[1:] - traj.means  # sigma_k xi_k: the action's noise
        return (torch.cat(grads) * step).flatten(2).sum(-1).detach()

    # --- the PPO family's hooks -------------------------------------------------------------------
    def advantages(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        G = self.returns(rewards, traj)
        self._logs = {"critic_mse": self.fit_critic(traj, G)}
        adv = self.first_order_advantages(traj)
        # one scale for the surrogate and the KL term: a smaller step, the same fixed point
        self._scale = float(adv.std()) + 1e-8 if self.normalize_advantages else 1.0
        return adv / self._scale

    def prepare(self, traj: Trajectory) -> None:
        self.prepare_reference_means(traj)

    def regulariser(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        return self.kl_weight * self.direct_kl(traj, means, steps, idx) / self._scale

    def update(self) -> dict[str, float]:
        logs = super().update()
        return {**logs, **self._logs}


class CTRLPlainCritic(CTRL):
    """CTRL with ``V_phi = NN_phi(x, s)`` alone (the ablation of their Fig. 2): no ``grad r``, so
    it runs with a black-box reward."""

    needs_differentiable_reward = False

    def __init__(self, *args, critic: str = "plain", **kw):
        if critic != "plain":
            raise ValueError(f"method.critic must be plain for {type(self).__name__} (got {critic!r}); "
                             "the structured critic is method=ctrl")
        super().__init__(*args, critic=critic, **kw)
