"""DPOK (Fan et al. 2023): policy gradient with a KL penalty to the pretrained chain.

Objective (q-learning paper eq. 35): ``reward_weight E[r(x_K)] - kl_weight sum_k
KL(p_theta(.|x_k) ‖ p_pre(.|x_k))``. The reward part is the family's clipped surrogate with an
unnormalised advantage ``reward_weight (r - mean r)`` (normalising would erase the
reward weight that sets the trade-off); the KL part is the closed-form Gaussian KL of each
step, differentiated through the recomputed means at the visited states. That gradient
holds the states fixed (no KL-to-go), so DPOK settles where each step trades its own KL
against the reward-only continuation — a *myopic* equilibrium, not the optimum of the
objective above (closed form in :mod:`diffusion_rl.evaluation.linear_gaussian`; tested).
"""

from __future__ import annotations

from torch import Tensor

from ..core.trajectory import Trajectory
from .policy_gradient import PolicyGradientMethod


class DPOK(PolicyGradientMethod):
    def __init__(self, *args, kl_weight: float = 1.0, **kw):
        kw.setdefault("normalize_advantages", False)
        super().__init__(*args, **kw)
        if kl_weight < 0:
            raise ValueError(f"method.kl_weight must be >= 0 (got {kl_weight})")
        self.kl_weight = kl_weight

    def prepare(self, traj: Trajectory) -> None:
        self.prepare_reference_means(traj)

    def regulariser(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        return self.kl_weight * self.direct_kl(traj, means, steps, idx)
