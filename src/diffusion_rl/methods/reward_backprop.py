"""Reward backpropagation through the sampling chain (DRaFT, AlignProp; the tutorial's
"direct reward backpropagation"; ELEGANT's drift-control step without its initial-
distribution step).

Maximises ``reward_weight E[r(x_K)] - kl_weight E[sum_k KL_k]`` by reparameterisation: the
chain's noises are fixed draws, so the final sample is a differentiable function of the
parameters through every step inside the gradient window. The per-step KL is the Gaussian
KL to the pretrained transition at the visited state (Girsanov's running cost once
summed). The variants are YAML only: ``nokl`` (window all, no KL), ``truncation``
(DRaFT-K: last K steps), ``random_k`` (AlignProp: K drawn per rollout).
"""

from __future__ import annotations

import torch

from .base import FineTuneMethod


class RewardBackprop(FineTuneMethod):
    needs_differentiable_reward = True

    def __init__(self, *args, reward_weight: float = 1.0, kl_weight: float = 0.0, micro_batch: int | None = None,
                 **kw):
        super().__init__(*args, **kw)
        if reward_weight < 0 or kl_weight < 0:
            raise ValueError("method.reward_weight and method.kl_weight must be >= 0")
        if micro_batch is not None and not 0 < micro_batch <= self.batch_size:
            raise ValueError(f"method.micro_batch must be in 1..batch_size={self.batch_size} or null (got {micro_batch})")
        # chains per backward: the batch's gradient accumulated over chunks (SD: 128 chains per
        # optimiser step, 4 per backward), the same gradient as one backward of the whole batch
        self.micro_batch = micro_batch
        if self.grad_window.kind == "none":
            raise ValueError("method.grad_window.kind must be all, last_k or random_k for reward backprop")
        self.reward_weight, self.kl_weight = reward_weight, kl_weight

    def update(self) -> dict[str, float]:
        return self.backprop_step()

    def backprop_step(self, x_init=None, optimiser=None) -> dict[str, float]:
        """One gradient step on ``reward_weight r(x_K) - kl_weight path KL`` from ``x_init``
        (default: the process's prior), accumulated over ``micro_batch`` chunks of chains."""
        opt = optimiser or self.optimizers()
        opt.zero_grad(set_to_none=True)
        size = self.micro_batch or self.batch_size
        logs = []
        for start in range(0, self.batch_size, size):
            n = min(size, self.batch_size - start)
            traj = self.rollout(grad=True, batch_size=n, x_init=None if x_init is None else x_init[start:start + n])
            # the reward reads the final *state* (relaxed one-hot for sequences, decoded pixels
            # for a latent model), so its gradient reaches the chain
            rewards = self.reward_of_state(traj.final)
            kl = traj.path_kl()
            # the chunk's share of the batch mean (x 1.0 exactly for one chunk)
            loss = (-(self.reward_weight * rewards).mean() + self.kl_weight * kl.mean()) * (n / self.batch_size)
            self.manual_backward(loss)
            logs.append((loss.detach(), rewards.detach(), kl.detach()))
        self.clip_and_step(opt)
        losses, rewards, kls = zip(*logs)
        return {"loss": sum(losses), "reward": torch.cat(rewards).mean(), "kl_path": torch.cat(kls).mean(),
                "grad_steps": traj.num_steps - traj.grad_start}
