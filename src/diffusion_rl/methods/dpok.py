"""DPOK (Fan et al. 2023): policy gradient with a KL penalty to the pretrained chain.

Objective (q-learning paper eq. 35): ``reward_weight E[r(x_K)] - kl_weight sum_k
KL(p_theta(.|x_k) ‖ p_pre(.|x_k))``. The reward part is DDPO's clipped surrogate with an
unnormalised advantage ``reward_weight (r - mean r)`` (normalising would erase the
reward weight that sets the trade-off); the KL part is the closed-form Gaussian KL of each
step, differentiated through the recomputed means at the visited states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.trajectory import Trajectory
from .ddpo import DDPO


class DPOK(DDPO):
    def __init__(self, *args, kl_weight: float = 1.0, **kw):
        kw.setdefault("normalize_advantages", False)
        super().__init__(*args, **kw)
        if kl_weight < 0:
            raise ValueError(f"method.kl_weight must be >= 0 (got {kl_weight})")
        self.kl_weight = kl_weight

    def prepare(self, traj: Trajectory) -> None:
        with torch.no_grad():
            self._ref_means = self.sampler.recompute_means(self.reference, traj)

    def extra_loss(self, traj: Trajectory, means: Tensor, idx: Tensor) -> Tensor:
        noisy = traj.stds > 0  # a deterministic last step (DDIM onto s = 0) has no Gaussian KL
        var = traj.stds[noisy].reshape(-1, *([1] * (means.dim() - 1))) ** 2
        kl = ((means[noisy] - self._ref_means[noisy][:, idx]) ** 2 / (2 * var)).flatten(2).sum(-1)  # [K', b]
        return self.kl_weight * kl.sum(0).mean()
