"""DDPO (Black et al. 2024): clipped policy gradient on the denoising chain, no KL.

Each iteration rolls out a batch (no gradient), computes advantages from the terminal
reward, then takes ``minibatches`` PPO steps over disjoint slices of that batch, every
step using all ``K`` transitions of its chains. The per-step Gaussian log-probabilities
come from recomputing the transition means under the current parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.trajectory import Trajectory
from .base import FineTuneMethod


class DDPO(FineTuneMethod):
    needs_stochastic_sampler = True  # the clipped ratio reads per-step log-probabilities

    def __init__(self, *args, clip_range: float = 0.2, minibatches: int = 4,
                 normalize_advantages: bool = True, reward_weight: float = 1.0, **kw):
        super().__init__(*args, **kw)
        if clip_range <= 0 or minibatches < 1 or reward_weight < 0:
            raise ValueError("method.clip_range > 0, method.minibatches >= 1 and method.reward_weight >= 0 required")
        self.clip_range, self.minibatches = clip_range, minibatches
        self.normalize_advantages, self.reward_weight = normalize_advantages, reward_weight

    def advantages(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        """``[B]`` (one advantage per chain) or ``[K, B]`` (per step). Batch-mean baseline;
        DDPO also divides by the std (a scale-free update)."""
        adv = self.reward_weight * (rewards - rewards.mean())
        if self.normalize_advantages:
            adv = adv / (rewards.std() + 1e-8)
        return adv

    def extra_loss(self, traj: Trajectory, means: Tensor, idx: Tensor) -> Tensor:
        """Hook for regularisers computed from the recomputed means (DPOK's KL)."""
        return means.new_zeros(())

    def prepare(self, traj: Trajectory) -> None:
        """Hook run once per rollout, before the PPO steps."""

    def update(self) -> dict[str, float]:
        traj = self.rollout()
        rewards = self.score_samples(traj.final)
        adv = self.advantages(rewards, traj)
        old_logp = traj.log_probs().detach()
        self.prepare(traj)
        perm = torch.randperm(self.batch_size, generator=self.generator, device=self.device)
        clipped = 0.0
        for idx in perm.chunk(self.minibatches):
            sub = _select(traj, idx)
            means = self.sampler.recompute_means(self.backbone, sub)
            ratio = torch.exp(sub.log_probs(means) - old_logp[:, idx])  # [K, b]
            a = adv[..., idx] if adv.dim() == 2 else adv[idx].unsqueeze(0)
            # summed over steps: the chain's log-likelihood is the sum of its steps' (this keeps
            # the reward term on the same scale as DPOK's summed per-step KL)
            surrogate = torch.minimum(ratio * a, ratio.clamp(1 - self.clip_range, 1 + self.clip_range) * a)
            pg = -surrogate.sum(0).mean()
            self.optimiser_step(pg + self.extra_loss(sub, means, idx))
            clipped += ((ratio - 1).abs() > self.clip_range).float().mean().item() / self.minibatches
        return {"reward": rewards.mean(), "kl_path": traj.path_kl().mean(), "clip_fraction": clipped}


def _select(traj: Trajectory, idx: Tensor) -> Trajectory:
    """The chains ``idx`` of a trajectory (batch dimension is 1 for per-step tensors)."""
    return Trajectory(states=traj.states[:, idx], times=traj.times, outputs=traj.outputs[:, idx],
                      means=traj.means[:, idx], stds=traj.stds, noises=traj.noises[:, idx],
                      kl=None if traj.kl is None else traj.kl[:, idx], cond=traj.cond)
