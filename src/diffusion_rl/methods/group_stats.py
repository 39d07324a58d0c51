"""Per-prompt reward statistics: DDPO's per-prompt stat tracking, the baseline of the public
image PPO code (Black et al. 2024; ELEGANT's PPO + KL fork, METHODS_SPEC §3.3).

A text-to-image batch mixes prompts whose rewards sit on different levels (a "cat" scores
higher than a "lobster" before any fine-tuning); a batch-mean baseline then rewards the easy
prompts, not the better images. Each chain's reward is instead centred on the mean of the
last ``buffer`` rewards of its own group (its prompt), this batch's included, and scaled by
their standard deviation; a group seen fewer than ``min_count`` times uses the whole batch's
(population) mean and std, as the public code does."""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


class GroupRewardStats:
    """Running per-group reward history (``state_dict`` goes into checkpoints: a resumed run
    continues with the same baselines)."""

    def __init__(self, buffer: int = 32, min_count: int = 16):
        if buffer < 1 or not 1 <= min_count <= buffer:
            raise ValueError(f"method.group_buffer >= 1 and 1 <= method.group_min_count <= group_buffer required "
                             f"(got {buffer}, {min_count})")
        self.buffer, self.min_count = int(buffer), int(min_count)
        self.history: dict[int, deque] = {}

    def centre_and_scale(self, groups: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
        """``(reward - baseline, std)`` per chain, both ``[B]`` on ``rewards``' device, after
        adding this batch's rewards to their groups' histories."""
        if groups.shape != rewards.shape or groups.dim() != 1:
            raise ValueError(f"groups and rewards must both be [B] (got {tuple(groups.shape)}, {tuple(rewards.shape)})")
        r = rewards.detach().double().cpu()
        keys = groups.detach().cpu().long()
        mean, std = torch.empty_like(r), torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        for key in keys.unique().tolist():
            rows = keys == key
            history = self.history.setdefault(key, deque(maxlen=self.buffer))
            history.extend(r[rows].tolist())
            if len(history) < self.min_count:
                mean[rows], std[rows] = batch_mean, batch_std
            else:
                seen = torch.tensor(list(history), dtype=torch.float64)
                mean[rows], std[rows] = seen.mean(), seen.std(unbiased=False)
        centred = (r - mean).to(rewards.device, rewards.dtype)
        return centred, (std + 1e-6).to(rewards.device, rewards.dtype)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "min_count": self.min_count,
                "history": {int(k): list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(k): deque(v, maxlen=self.buffer) for k, v in state["history"].items()}
