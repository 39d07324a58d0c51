"""Path consistency learning (tutorial §6.3, Alg. 5, Lemma 4 eq. 33, Corollary 1 eq. 35;
METHODS_SPEC §2.4).

Consistency (project indexing, ``x_{k+1}`` drawn by transition ``k``, ``v_K = r``). The optimal
step is ``p*_k(y|x) = p^pre_k(y|x) exp((v_{k+1}(y) - v_k(x)) / alpha)`` (tutorial eq. 19), so
for *every* pair ``(x_k, x_{k+1})``

    v_k(x_k) - v_{k+1}(x_{k+1}) + alpha [log p*_k(x_{k+1}|x_k) - log p^pre_k(x_{k+1}|x_k)] = 0,

and summed over steps ``k..e-1`` the intermediate values cancel (sub-trajectory; ``k = 0, e = K``
is trajectory balance, Cor. 1, with ``V(x_0, T)`` in GFlowNet's log Z role). The losses are the
squared residuals (alpha-scaled, as in Nachum et al.: the same minimisers, well conditioned as
alpha -> 0), with ``V_phi(x_K) := r(x_K)`` and, for the sampler's fixed-variance Gaussian steps,

    l^theta_k - l^pre_k = (|x_{k+1} - m^pre_k|^2 - |x_{k+1} - m^theta_k|^2) / (2 sigma_k^2)

(the log-normalisers cancel exactly: no ``d log sigma`` terms for 16384-dim latents).

Per iteration: an on-policy rollout without gradient (no replay buffer: the tutorial's
off-policy option is not implemented, so a resumed run needs no buffer state); ``m^theta``
recomputed with gradient, ``m^pre`` without; one Adam step on ``phi`` for the residuals with
``theta`` detached and one on ``theta`` with ``phi`` detached (Alg. 5 uses one residual for both).

Which fixed point (derived). Given ``x_k``, ``E[grad l^theta_k] = 0`` on-policy, so the policy
gradient of ``E delta^2`` is ``-2 alpha`` times the gradient of ``E[V(x_e) - alpha sum_j KL-terms]``:
a soft policy improvement against ``V``. Trajectory balance therefore follows the exact gradient
of ``E r - alpha E[path KL]`` (``V(x_0)`` is a baseline). With a fixed-variance policy the
residual keeps a noise-dependent part that no ``V`` removes, and minimising ``E delta^2`` through
*both* ends of a residual (PCL's full gradient, not TD's semi-gradient) biases ``V`` towards
values whose next-state spread is small (the double-sampling bias of residual gradients): a
small gap to the fixed-variance optimum (tests/test_closed_form_pcl.py measures it; it would
vanish with a learnable-variance policy, whose residual is 0 at the optimum). ``value_gradient:
semi`` holds ``V(x_e)`` fixed in the value loss (TD's semi-gradient): ``V_k`` then fits the
on-policy soft value ``E[V_e - alpha sum_j (l^theta_j - l^pre_j) | x_k]`` and the fixed point is
the fixed-variance optimum itself (trajectory balance is unaffected: its ``V_e`` is ``r``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..nets import TimeConditionedMLP
from .base import FineTuneMethod

CONSISTENCIES = ("detailed", "subtrajectory", "trajectory")
VALUE_GRADIENTS = ("full", "semi")


def log_ratio(x_next: Tensor, mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """``[K, B]`` ``l^theta_k - l^pre_k`` of recorded ``x_{k+1}`` (``[K, B, *E]``) for Gaussian steps
    with the same ``std_k`` (``[K]``), as a difference of squared distances (the normalisers cancel)."""
    sq = lambda m: ((x_next - m) ** 2).flatten(2).sum(-1)
    return (sq(ref_mean) - sq(mean)) / (2 * std.unsqueeze(1) ** 2)


def consistency_residuals(values: Tensor, scaled_log_ratio: Tensor, m: int, end_values: Tensor | None = None) -> Tensor:
    """``[K, B]`` residuals ``delta_k = V_k - V_e + sum_{j=k}^{e-1} alpha (l^theta_j - l^pre_j)``,
    ``e = min(k + m, K)``; ``values [K+1, B]`` with ``values[K] = r(x_K)``, ``scaled_log_ratio [K, B]``
    already multiplied by alpha. ``m = 1``: detailed balance; row 0 of ``m = K``: trajectory balance.
    ``end_values`` (default ``values``) supplies ``V_e`` (detached: the semi-gradient)."""
    K, B = scaled_log_ratio.shape
    end_values = values if end_values is None else end_values
    k = torch.arange(K, device=values.device)
    end = (k + m).clamp(max=K)
    # window sums by unfolding the zero-padded steps (exact, unlike differences of a cumsum)
    padded = torch.cat([scaled_log_ratio, scaled_log_ratio.new_zeros(m - 1, B)])
    return values[k] - end_values[end] + padded.unfold(0, m, 1).sum(-1)


class PCL(FineTuneMethod):
    needs_stochastic_sampler = True  # the residual is a log-density ratio of every step

    def __init__(self, *args, kl_weight: float, consistency: str = "detailed", subtrajectory_m: int = 5,
                 value_lr: float = 1e-3, value_hidden: Sequence[int] = (256, 256), value_time_dim: int = 32,
                 value_time_scale: float | None = None, value_gradient: str = "full", **kw):
        super().__init__(*args, **kw)
        if consistency not in CONSISTENCIES:
            raise ValueError(f"method.consistency must be one of {'|'.join(CONSISTENCIES)} (got {consistency!r})")
        if value_gradient not in VALUE_GRADIENTS:
            raise ValueError(f"method.value_gradient must be one of {'|'.join(VALUE_GRADIENTS)} (got {value_gradient!r})")
        if kl_weight <= 0:
            raise ValueError(f"method.kl_weight must be > 0: PCL's consistency is defined by alpha (got {kl_weight})")
        if int(subtrajectory_m) != subtrajectory_m or subtrajectory_m < 1:
            raise ValueError(f"method.subtrajectory_m must be an integer >= 1 (got {subtrajectory_m})")
        if value_lr <= 0:
            raise ValueError(f"method.value_lr must be > 0 (got {value_lr})")
        self._check_noisy_steps()
        K = self.sampler.num_steps
        # the window length of each consistency; m > K is clamped at the end anyway
        self.window = {"detailed": 1, "subtrajectory": min(int(subtrajectory_m), K), "trajectory": K}[consistency]
        self.kl_weight, self.consistency, self.value_lr = float(kl_weight), consistency, value_lr
        self.value_gradient = value_gradient
        # V_phi(x, s) at s_0..s_{K-1}; the terminal value is the reward itself
        self.value = TimeConditionedMLP(self.backbone.event_shape, value_hidden, value_time_dim,
                                        value_time_scale or self.sampler.process.time_scale)

    def _check_noisy_steps(self) -> None:
        """A step with sigma_k = 0 has no density, so no consistency residual: refuse it here."""
        if not self.sampler.final_noise:
            raise ValueError("method pcl needs a Gaussian density at every step, but sampler.final_noise=false "
                             "makes the last step deterministic: set sampler.final_noise=true")
        x = torch.zeros(1, *self.backbone.event_shape)
        for k in range(self.sampler.num_steps):
            _, std = self.sampler.transition(x, torch.full((1,), k, dtype=torch.long), torch.zeros_like(x))
            if not bool((std > 0).all()):
                raise ValueError(f"method pcl needs a Gaussian density at every step, but step {k} of "
                                 f"{type(self.sampler).__name__} has std 0 (e.g. DDIM onto s = 0): use "
                                 "sampler=euler_maruyama or a process with t_min > 0")

    def configure_optimizers(self):
        return [self.build_policy_optimizer(),
                torch.optim.Adam(self.value.parameters(), lr=self.value_lr)]

    def log_ratio(self, x_next: Tensor, mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
        return log_ratio(x_next, mean, ref_mean, std)

    def loss(self, values: Tensor, scaled_log_ratio: Tensor, end_values: Tensor | None = None) -> Tensor:
        """``mean_b sum_k delta_k^2`` over the consistency's residuals (one per chain for trajectory balance)."""
        delta = consistency_residuals(values, scaled_log_ratio, self.window, end_values)
        if self.consistency == "trajectory":
            delta = delta[:1]
        return (delta**2).sum(0).mean()

    def update(self) -> dict[str, float]:
        traj = self.rollout(with_reference=False)  # on-policy, no gradient: the states are data
        K, B = traj.num_steps, traj.final.shape[0]
        with torch.no_grad():
            ref_means = self.sampler.recompute_means(self.reference, traj)
        means = self.sampler.recompute_means(self.backbone, traj)
        ratio = self.kl_weight * self.log_ratio(traj.states[1:], means, ref_means, traj.stds)
        rewards = self.score_samples(traj.final).detach()
        v = self.value(traj.states[:-1].flatten(0, 1), traj.times[:-1].repeat_interleave(B)).reshape(K, B)
        values = torch.cat([v, rewards.to(v.dtype).unsqueeze(0)])
        # theta detached; "semi": V(x_e) is a target (TD), so V_k fits the conditional mean
        value_loss = self.loss(values, ratio.detach(), values.detach() if self.value_gradient == "semi" else None)
        policy_loss = self.loss(values.detach(), ratio)  # phi detached
        opt_policy, opt_value = self.optimizers()
        opt_policy.zero_grad(set_to_none=True)
        opt_value.zero_grad(set_to_none=True)
        # the two losses touch disjoint parameters: one backward gives each its own gradient
        self.manual_backward(value_loss + policy_loss)
        self.clip_and_step(opt_value)
        self.clip_and_step(opt_policy)
        # the rollout's means are the current policy's: the path KL needs only the reference means
        kl = ((traj.means - ref_means) ** 2).flatten(2).sum(-1) / (2 * traj.stds.unsqueeze(1) ** 2)
        return {"value_loss": value_loss, "policy_loss": policy_loss, "reward": rewards.mean(),
                "kl_path": kl.sum(0).mean(), "value_start": v[0].mean()}
