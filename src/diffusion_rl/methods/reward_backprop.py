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

from .base import FineTuneMethod


class RewardBackprop(FineTuneMethod):
    needs_differentiable_reward = True

    def __init__(self, *args, reward_weight: float = 1.0, kl_weight: float = 0.0, **kw):
        super().__init__(*args, **kw)
        if reward_weight < 0 or kl_weight < 0:
            raise ValueError("method.reward_weight and method.kl_weight must be >= 0")
        if self.grad_window.kind == "none":
            raise ValueError("method.grad_window.kind must be all, last_k or random_k for reward backprop")
        self.reward_weight, self.kl_weight = reward_weight, kl_weight

    def update(self) -> dict[str, float]:
        return self.backprop_step()

    def backprop_step(self, x_init=None, optimiser=None) -> dict[str, float]:
        """One gradient step on ``reward_weight r(x_K) - kl_weight path KL`` from ``x_init``
        (default: the process's prior)."""
        traj = self.rollout(grad=True, x_init=x_init)
        # the reward reads the final *state* (relaxed one-hot for sequences), not a decoded
        # sample, so its gradient reaches the chain
        rewards = self.reward(traj.final)
        kl = traj.path_kl()
        loss = -(self.reward_weight * rewards).mean() + self.kl_weight * kl.mean()
        self.optimiser_step(loss, optimiser)
        return {"loss": loss.detach(), "reward": rewards.detach().mean(), "kl_path": kl.detach().mean(),
                "grad_steps": traj.num_steps - traj.grad_start}
