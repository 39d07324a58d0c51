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
from .group_stats import GroupRewardStats


class PolicyGradientMethod(FineTuneMethod):
    needs_stochastic_sampler = True  # the clipped ratio reads per-step log-probabilities
    #: whether :meth:`centred_rewards`' per-prompt baseline (``advantage_groups``) applies: a
    #: sibling whose baseline is not the reward's (per-step returns, a critic) sets False
    groups_advantages = True

    def __init__(self, *args, clip_range: float = 0.2, minibatches: int = 4, normalize_advantages: bool = True,
                 reward_weight: float = 1.0, steps_per_backward: int | None = None,
                 advantage_groups: str | None = None, group_buffer: int = 32, group_min_count: int = 16,
                 advantage_clip: float | None = None, **kw):
        super().__init__(*args, **kw)
        if clip_range <= 0 or minibatches < 1 or reward_weight < 0:
            raise ValueError("method.clip_range > 0, method.minibatches >= 1 and method.reward_weight >= 0 required")
        if steps_per_backward is not None and steps_per_backward < 1:
            raise ValueError(f"method.steps_per_backward must be >= 1 or null (got {steps_per_backward})")
        if advantage_clip is not None and advantage_clip <= 0:
            raise ValueError(f"method.advantage_clip must be > 0 or null (got {advantage_clip})")
        self.clip_range, self.minibatches = clip_range, minibatches
        self.normalize_advantages, self.reward_weight = normalize_advantages, reward_weight
        self.steps_per_backward, self.advantage_clip = steps_per_backward, advantage_clip
        self.advantage_groups = advantage_groups
        self.group_stats = None
        if advantage_groups is not None:
            self.check_advantage_groups(advantage_groups)
            self.group_stats = GroupRewardStats(group_buffer, group_min_count)

    def check_advantage_groups(self, name: str) -> None:
        """``advantage_groups`` names a per-chain integer condition (``prompt``) of this task."""
        where = f"method.advantage_groups={name}"
        if not self.groups_advantages:
            raise ValueError(f"{where}: {type(self).__name__}'s baseline is not the reward's, so a per-prompt reward "
                             "baseline does not apply (DDPO, DPOK and soft PPO take it)")
        probe = self.condition_source.sample(2, torch.Generator())  # a throwaway draw: only the keys matter
        if not probe or name not in probe or probe[name].dim() != 1 or probe[name].is_floating_point():
            have = ", ".join(probe) if probe else "none (an unconditional task)"
            raise ValueError(f"{where}: the chains carry no integer condition '{name}' to group them by "
                             f"(their conditions: {have})")

    # --- what siblings override ------------------------------------------------------------
    def centred_rewards(self, rewards: Tensor, traj: Trajectory) -> tuple[Tensor, Tensor]:
        """``(rewards - baseline, scale)``: the batch mean and, when ``normalize_advantages``,
        the batch std (DDPO's scale-free update; scale 1 otherwise); with ``advantage_groups``
        each chain's prompt's running mean and std (:mod:`.group_stats`). ``scale`` is a scalar
        or ``[B]``."""
        if self.group_stats is None:
            scale = rewards.std() + 1e-8 if self.normalize_advantages else torch.ones((), device=rewards.device)
            return rewards - rewards.mean(), scale
        groups = traj.cond[self.advantage_groups]
        if self.world_size() > 1:  # every rank tracks the whole batch (the public code gathers too)
            gather = self.trainer.strategy.all_gather
            all_groups, all_rewards = gather(groups).flatten(), gather(rewards.detach()).flatten()
            centred, scale = self.group_stats.centre_and_scale(all_groups, all_rewards)
            mine = slice(self.global_rank * len(rewards), (self.global_rank + 1) * len(rewards))
            centred, scale = centred[mine], scale[mine]
        else:
            centred, scale = self.group_stats.centre_and_scale(groups, rewards)
        return centred, scale if self.normalize_advantages else torch.ones_like(scale)

    def clip_advantages(self, adv: Tensor) -> Tensor:
        """DDPO's ``adv_clip_max`` (the public image code clips at 5); no clip by default."""
        return adv if self.advantage_clip is None else adv.clamp(-self.advantage_clip, self.advantage_clip)

    def advantages(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        """``[B]`` (one advantage per chain) or ``[K, B]`` (per step): the centred reward over
        its scale (:meth:`centred_rewards`)."""
        centred, scale = self.centred_rewards(rewards, traj)
        return self.clip_advantages(self.reward_weight * centred / scale)

    def prepare(self, traj: Trajectory) -> None:
        """Run once per rollout, before the PPO steps."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.group_stats is not None:
            checkpoint["advantage_group_stats"] = self.group_stats.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.group_stats is not None and "advantage_group_stats" in checkpoint:
            self.group_stats.load_state_dict(checkpoint["advantage_group_stats"])

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
