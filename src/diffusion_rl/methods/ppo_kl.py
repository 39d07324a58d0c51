"""PPO + KL (ELEGANT App. E.3): DDPO's clipped ratio on ``E r(x_K) - kl_weight E[path KL]``.

ELEGANT builds this baseline by "modifying the DDPO codebase to include the added KL penalty
term" (eqs. 22–23 are lost in our copy). The objective's gradient has two parts, because the
per-step KL ``KL_k(theta; x_k)`` depends on the parameters both directly and through the
state ``x_k`` that earlier steps produced:

    grad E[sum_k KL_k] = E[sum_k grad KL_k(theta; x_k)]                        (direct)
                       + E[sum_k grad log p_theta(x_{k+1}|x_k) sum_{j>k} KL_j]  (through the states)

``kl_penalty`` picks how the KL enters (both are unbiased for the same objective, whose
optimum in the Gaussian chain is the fixed-variance one, tested in closed form):

* ``analytic`` (default): the closed-form Gaussian KL of each step; the direct part is
  differentiated through the recomputed means (as DPOK does), the second part is the
  KL-to-go of the *later* steps inside step ``k``'s advantage;
* ``log_ratio``: the RLHF construction — step ``k`` earns the sampled estimate
  ``-kl_weight log(p_theta / p_pre)(x_{k+1} | x_k)`` as a reward, and the advantage is the
  return-to-go from ``k`` on (the score-function identity supplies the direct part; noisier).

Advantages are the per-step return-to-go minus its batch mean; with ``normalize_advantages``
(DDPO's scale-free update) the whole loss — direct KL term included — is divided by the
advantages' std, which rescales the step without moving the optimum.

(The first version put the closed-form KL only into the return-to-go of every step
including the current one and differentiated nothing: a KL that does not depend on the
action has a zero score-function gradient, so nothing held the chain near the reference
and PPO + KL drifted to KL in the thousands.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.trajectory import Trajectory
from .policy_gradient import PolicyGradientMethod

KL_PENALTIES = ("analytic", "log_ratio")


class PPOKL(PolicyGradientMethod):
    groups_advantages = False  # its baseline is the per-step return's batch mean (KL-to-go included)

    def __init__(self, *args, kl_weight: float = 0.1, kl_penalty: str = "analytic", **kw):
        super().__init__(*args, **kw)
        if kl_weight < 0:
            raise ValueError(f"method.kl_weight must be >= 0 (got {kl_weight})")
        if kl_penalty not in KL_PENALTIES:
            raise ValueError(f"method.kl_penalty must be one of {'|'.join(KL_PENALTIES)} (got {kl_penalty!r})")
        self.kl_weight, self.kl_penalty = kl_weight, kl_penalty
        self._loss_scale = 1.0

    def prepare(self, traj: Trajectory) -> None:
        if self.kl_penalty == "analytic":
            self.prepare_reference_means(traj)

    def advantages(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        if self.kl_penalty == "analytic":
            kl = traj.kl.detach()  # [K, B], closed form at the rollout's parameters
            later = kl.flip(0).cumsum(0).flip(0) - kl  # sum_{j > k}: what step k's action changes
        else:
            with torch.no_grad():
                ref_means = self.sampler.recompute_means(self.reference, traj, chunk_steps=self.steps_per_backward)
                log_ratio = traj.log_probs().detach() - traj.log_probs(ref_means)  # [K, B]
            later = log_ratio.flip(0).cumsum(0).flip(0)  # sum_{j >= k}: this step's own draw included
        returns = self.reward_weight * rewards.unsqueeze(0) - self.kl_weight * later  # [K, B]
        adv = returns - returns.mean(1, keepdim=True)
        self._loss_scale = float(adv.std()) + 1e-8 if self.normalize_advantages else 1.0
        return adv / self._loss_scale

    def regulariser(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        if self.kl_penalty != "analytic":
            return means.new_zeros(())
        return self.kl_weight * self.direct_kl(traj, means, steps, idx) / self._loss_scale
