"""The policy-gradient family on the denoising chain: DDPO, DPOK, PPO + KL, soft PPO and
CTRL are siblings under :class:`PolicyGradientMethod`.

Every iteration rolls out a batch without gradient, turns the terminal rewards into
advantages (one per chain ``[B]`` or per step ``[K, B]``), then takes ``minibatches`` PPO
steps over disjoint slices of the batch. Each PPO step recomputes the transition means of
its chains under the current parameters, forms the clipped surrogate of every step's ratio,
adds the method's regulariser, and backpropagates. The objective is a sum over steps, so its
gradient is the sum of per-step gradients: with ``steps_per_backward`` set, the steps are
recomputed and backpropagated a few at a time (gradients accumulate), and the autograd graph
never holds more than that many steps of the backbone — a 50-step chain of a large backbone
then needs about the memory of a short one. ``null`` keeps one backward over all steps (the
fastest for small networks; the same numbers up to float summation order otherwise).

A sibling overrides :meth:`advantages`, :meth:`step_advantages` and/or :meth:`regulariser`
(and :meth:`prepare`, run once per rollout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.trajectory import Trajectory
from .base import FineTuneMethod


class PolicyGradientMethod(FineTuneMethod):
    needs_stochastic_sampler = True  # the clipped ratio reads per-step log-probabilities

    def __init__(self, *args, clip_range: float = 0.2, minibatches: int = 4, normalize_advantages: bool = True,
                 reward_weight: float = 1.0, steps_per_backward: int | None = None, **kw):
        super().__init__(*args, **kw)
        if clip_range <= 0 or minibatches < 1 or reward_weight < 0:
            raise ValueError("method.clip_range > 0, method.minibatches >= 1 and method.reward_weight >= 0 required")
        if steps_per_backward is not None and steps_per_backward < 1:
            raise ValueError(f"method.steps_per_backward must be >= 1 or null (got {steps_per_backward})")
        self.clip_range, self.minibatches = clip_range, minibatches
        self.normalize_advantages, self.reward_weight = normalize_advantages, reward_weight
        self.steps_per_backward = steps_per_backward

    # --- what siblings override ------------------------------------------------------------
    def advantages(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        """``[B]`` (one advantage per chain) or ``[K, B]`` (per step). Batch-mean baseline,
        divided by the reward std when ``normalize_advantages`` (DDPO's scale-free update)."""
        adv = self.reward_weight * (rewards - rewards.mean())
        if self.normalize_advantages:
            adv = adv / (rewards.std() + 1e-8)
        return adv

    def prepare(self, traj: Trajectory) -> None:
        """Run once per rollout, before the PPO steps."""

    def step_advantages(self, adv: Tensor, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        """The ``[len(steps), b]`` advantages that multiply the ratios inside the clipped
        surrogate; may depend on the parameters through the recomputed ``means`` (the
        tutorial's soft PPO puts the per-step KL there). Default: ``adv`` as given."""
        return adv

    def regulariser(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        """Added to the loss of the chains ``idx`` at ``steps``, from their recomputed ``means``
        (``[len(steps), b, *E]``); must be a sum over those steps (it is backpropagated per chunk)."""
        return means.new_zeros(())

    def policy_optimizer(self):
        """The optimiser of the PPO steps: the only one by default; a sibling that trains more
        (CTRL's critic) returns its policy optimiser here."""
        return self.optimizers()

    # --- the analytic KL at the visited states (DPOK, PPO + KL) ------------------------------
    def prepare_reference_means(self, traj: Trajectory) -> None:
        """The pretrained means at the recorded states: constants of the direct KL term (the
        states are data here; the KL's dependence on earlier steps is the advantages' job)."""
        with torch.no_grad():
            self._ref_means = self.sampler.recompute_means(self.reference, traj, chunk_steps=self.steps_per_backward)

    def step_kls(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        """``[len(steps), b]`` closed-form ``KL_k(theta; x_k)`` at the recorded states,
        differentiable through the recomputed ``means`` only. A deterministic step (DDIM onto
        s = 0) has no Gaussian KL: 0 there."""
        stds = traj.stds[steps.start:steps.stop]
        ref = self._ref_means[steps.start:steps.stop][:, idx]
        safe = torch.where(stds > 0, stds, torch.ones_like(stds)).reshape(-1, *([1] * (means.dim() - 1)))
        kl = ((means - ref) ** 2 / (2 * safe**2)).flatten(2).sum(-1)  # [k', b]
        return torch.where((stds > 0).unsqueeze(1), kl, torch.zeros_like(kl))

    def direct_kl(self, traj: Trajectory, means: Tensor, steps: range, idx: Tensor) -> Tensor:
        """``mean_b sum_k KL_k(theta; x_k)`` over ``steps`` (:meth:`step_kls`)."""
        return self.step_kls(traj, means, steps, idx).sum(0).mean()

    # --- one iteration -----------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        traj = self.rollout()
        rewards = self.score_samples(traj.final)
        adv = self.advantages(rewards, traj)
        old_logp = traj.log_probs().detach()
        self.prepare(traj)
        K = traj.num_steps
        chunk = self.steps_per_backward or K
        opt = self.policy_optimizer()
        perm = torch.randperm(self.batch_size, generator=self.generator, device=self.device)
        clipped = 0.0
        for idx in perm.chunk(self.minibatches):
            sub = traj.select(idx)
            opt.zero_grad(set_to_none=True)
            for start in range(0, K, chunk):
                steps = range(start, min(start + chunk, K))
                means = self.sampler.recompute_means(self.backbone, sub, steps)
                ratio = torch.exp(sub.log_probs(means, steps) - old_logp[start:steps.stop, idx])  # [k, b]
                a = adv[start:steps.stop, idx] if adv.dim() == 2 else adv[idx].unsqueeze(0).expand(len(steps), -1)
                a = self.step_advantages(a, sub, means, steps, idx)
                # summed over steps: the chain's log-likelihood is the sum of its steps' (this keeps
                # the reward term on the same scale as DPOK's summed per-step KL)
                surrogate = torch.minimum(ratio * a, ratio.clamp(1 - self.clip_range, 1 + self.clip_range) * a)
                loss = -surrogate.sum(0).mean() + self.regulariser(sub, means, steps, idx)
                self.manual_backward(loss)
                clipped += ((ratio - 1).abs() > self.clip_range).float().sum().item() / (K * len(idx) * self.minibatches)
            self.clip_and_step(opt)
        return {"reward": rewards.mean(), "kl_path": traj.path_kl().mean(), "clip_fraction": clipped}
