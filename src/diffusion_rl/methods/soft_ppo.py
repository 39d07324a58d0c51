"""Soft PPO (Uehara, Zhao, Biancalani & Levine 2024, tutorial §5.1, Alg. 1, eq. 21).

Each step's cost ``-(r(x_K) - b) + kl_weight KL_k(theta; x_k)`` multiplies that step's
likelihood ratio inside PPO's pessimistic clipped objective (eq. 21 with the sign read as
PPO's bound; the extraction prints ``min`` of a cost):

    L(theta) = E_old sum_k max(c_k(theta) rho_k, c_k(theta) clip(rho_k, 1 - eps, 1 + eps)),

with ``KL_k`` recomputed under the current parameters *with* gradient ("|theta=theta_s"
after the gradient in Alg. 1). This is also how ELEGANT's authors built their image PPO + KL
baseline (their public DDPO fork puts ``-A + beta KL_k(theta)`` inside the clipped ratio);
``method=ppo_kl`` is the other reading, KL-to-go in the advantage.

Which optimum: at the old parameters the gradient is ``E sum_k [(adv - alpha KL_k) grad log
rho_k - alpha grad KL_k]``; ``KL_k`` depends on ``x_k`` only, so the first KL term has zero
mean and the estimator is DPOK's in expectation. Step k's effect on the *later* steps' KL is
missing, so soft PPO settles at the myopic-KL equilibrium, not at the optimum of
``E r - alpha E[path KL]`` (closed form in :mod:`diffusion_rl.evaluation.linear_gaussian`;
tests/test_closed_form_optimum.py).
"""

from __future__ import annotations

from torch import Tensor

from ..core.trajectory import Trajectory
from .dpok import DPOK


class SoftPPO(DPOK):
    """DPOK's objective and KL weight, with the KL moved from the added regulariser into the
    clipped term's per-step cost."""

    def advantages(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        centred, scale = self.centred_rewards(rewards, traj)
        # DDPO's normalisation divides the whole per-step cost (KL included), which rescales
        # the step without moving the equilibrium (per chain with a per-prompt baseline; the
        # public image code divides the reward only, which weakens the KL by the reward's std)
        # one batch scale is a number (a tensor divisor would be saved for backward)
        self._scale = float(scale) if scale.dim() == 0 else scale
        return self.clip_advantages(self.reward_weight * centred / self._scale)

    def step_advantages(self, adv: Tensor, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        scale = self._scale if isinstance(self._scale, float) else self._scale[idx]
        return adv - self.kl_weight * self.step_kls(traj, means, steps, idx) / scale

    def regulariser(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        return means.new_zeros(())
