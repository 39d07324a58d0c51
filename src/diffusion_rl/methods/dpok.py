"""DPOK (Fan et al. 2023): policy gradient with a KL penalty to the pretrained chain.

Objective (q-learning paper eq. 35): ``reward_weight E[r(x_K)] - kl_weight sum_k
KL(p_theta(.|x_k) ‖ p_pre(.|x_k))``. The reward part is the family's clipped surrogate with an
unnormalised advantage ``reward_weight (r - mean r)`` (normalising would erase the
reward weight that sets the trade-off); the KL part is the closed-form Gaussian KL of each
step, differentiated through the recomputed means at the visited states.
"""

from __future__ import annotations

import torch
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
        with torch.no_grad():  # the reference's means: constants of the KL, in the same step chunks
            self._ref_means = self.sampler.recompute_means(self.reference, traj, chunk_steps=self.steps_per_backward)

    def regulariser(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        stds = traj.stds[steps.start:steps.stop]
        noisy = stds > 0  # a deterministic last step (DDIM onto s = 0) has no Gaussian KL
        ref = self._ref_means[steps.start:steps.stop][:, idx]
        var = stds[noisy].reshape(-1, *([1] * (means.dim() - 1))) ** 2
        kl = ((means[noisy] - ref[noisy]) ** 2 / (2 * var)).flatten(2).sum(-1)  # [k', b]
        return self.kl_weight * kl.sum(0).mean()
