"""Reward-weighted MLE (tutorial §6.1, Alg. 3, Lemmas 1–3, eqs. 24–26).

Online (default): for each step ``k``, a state ``x_k`` from any roll-in, the *pretrained*
continuation ``x_{k+1}, ..., x_K``, and the weighted likelihood of the first step,

    max_theta  sum_k E[ exp(r(x_K)/alpha) log p_theta_k(x_{k+1} | x_k) ]           (25)

Given ``x_{k+1}`` the weight's mean is ``exp(v_{k+1}(x_{k+1})/alpha)`` (Lemma 3), so the
weighted law of ``x_{k+1} | x_k`` is the optimal step ``p*_k`` and a Gaussian policy with the
sampler's variances learns its mean ``m*_k``: the fixed-variance optimum of
``E r - alpha E[path KL]`` (tests/test_closed_form_optimum.py). One switch per chain instead
of K rollouts per step: chain ``b`` follows the current policy up to a step ``k*_b`` and the
pretrained model from there on, and contributes the pair ``(x_{k*}, x_{k*+1})``.

``continuation: policy`` weights the fine-tuned model's own continuations (the iterated
reward-weighted regression of Peters & Schaal / DDPO's RWR): each iteration tilts by
``exp(r/alpha)`` again, so it drifts towards argmax r — kept as the negative control the
spec names, not as a method of the tutorial.

Offline (``variant: offline``, eq. 26): denoising score matching on data rows with weights
``exp(r(x_0)/alpha)``: the score of the tilted *data* law, valid when the pretrained model is
the data law. Weights are always a softmax (``exp(r/alpha)`` overflows at alpha = 0.005).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.conditioning import index_cond
from ..pretrain.modules import denoising_score_matching
from .base import FineTuneMethod


class SwitchPolicy(nn.Module):
    """``policy`` for the steps before each chain's switch time, ``reference`` from it on
    (``s_k > switch[b]`` <=> ``k < k*_b`` on a decreasing time grid)."""

    def __init__(self, policy: nn.Module, reference: nn.Module, switch_times: Tensor):
        super().__init__()
        self.policy, self.reference, self.switch_times = policy, reference, switch_times

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        before = s > self.switch_times
        out = self.reference(x, s, cond)
        if before.any():  # the policy on the chains still rolling in (no call once all switched)
            idx = before.nonzero().squeeze(1)
            out = out.clone()
            out[idx] = self.policy(x[idx], s[idx], index_cond(cond, idx)).to(out.dtype)
        return out


def normalised_weights(rewards: Tensor, alpha: float, groups: Tensor | None = None) -> Tensor:
    """``exp(r/alpha)`` normalised to mean 1 (within each group), computed as a softmax."""
    if groups is None:
        return torch.softmax(rewards / alpha, 0) * rewards.numel()
    w = torch.empty_like(rewards)
    for g in groups.unique():
        members = groups == g
        w[members] = torch.softmax(rewards[members] / alpha, 0) * members.sum()
    return w


class RewardWeightedMLE(FineTuneMethod):
    # online: the weighted likelihood of one noisy step per chain (a zero-noise step has none)
    needs_stochastic_sampler = True

    def __init__(self, *args, kl_weight: float, variant: str = "online", switch: str = "stratified",
                 continuation: str = "pretrained", log_every: int = 10, s_min: float = 1e-3, **kw):
        super().__init__(*args, **kw)
        if kl_weight <= 0:
            raise ValueError(f"method.kl_weight must be > 0: RW-MLE's weights are exp(r / kl_weight) (got {kl_weight})")
        for key, value, options in (("variant", variant, ("online", "offline")), ("switch", switch, ("stratified", "uniform")),
                                    ("continuation", continuation, ("pretrained", "policy"))):
            if value not in options:
                raise ValueError(f"method.{key} must be one of {'|'.join(options)} (got {value!r})")
        if variant == "offline" and self.dataset is None:
            raise ValueError("method.variant=offline trains on data rows: the run needs a dataset")
        if log_every < 1:
            raise ValueError(f"method.log_every must be >= 1 (got {log_every})")
        self.kl_weight, self.variant, self.switch, self.continuation = kl_weight, variant, switch, continuation
        self.log_every, self.s_min = log_every, s_min
        self._iteration = 0

    def switch_steps(self) -> Tensor:
        """``k*_b`` per chain: stratified = every step equally often (shuffled), or uniform draws."""
        K, B = self.sampler.num_steps, self.batch_size
        if self.switch == "uniform":
            return torch.randint(K, (B,), generator=self.data_generator)
        return torch.arange(B)[torch.randperm(B, generator=self.data_generator)] % K

    def online_loss(self) -> tuple[Tensor, Tensor]:
        k_star = self.switch_steps().to(self.device)
        times = self.sampler.times.to(self.device)
        continuation = self.backbone if self.continuation == "policy" else self.reference
        # the switch happens at the *next* step: x_{k*+1} is drawn by the continuation model
        policy = SwitchPolicy(self.backbone, continuation, times[k_star])
        traj = self.rollout(policy, with_reference=False)  # no gradient: the pairs are data
        rewards = self.score_samples(traj.final)
        weights = normalised_weights(rewards, self.kl_weight, k_star if self.switch == "stratified" else None)
        b = torch.arange(self.batch_size, device=self.device)
        x, x_next = traj.states[k_star, b], traj.states[k_star + 1, b]
        std = traj.stds[k_star]
        noisy = std > 0  # a deterministic last step has no likelihood
        mean, _ = self.sampler.transition(x, k_star, self.backbone(x, times[k_star], traj.cond))
        sq = ((x_next - mean) ** 2).flatten(1).sum(-1) / (2 * torch.where(noisy, std, torch.ones_like(std)) ** 2)
        return (weights * sq * noisy).mean(), rewards

    def offline_loss(self) -> tuple[Tensor, Tensor]:
        x0 = self.dataset.sample(self.batch_size, self.data_generator).to(self.device)
        rewards = self.score_samples(x0)
        s = self.s_min + torch.rand(self.batch_size, generator=self.generator, device=self.device) * (self.sampler.process.T - self.s_min)
        eps = torch.randn(x0.shape, generator=self.generator, device=self.device)
        per_row = denoising_score_matching(self.backbone, self.sampler.process, x0, s, eps)
        return (normalised_weights(rewards, self.kl_weight) * per_row).mean(), rewards

    # the monitoring rollouts draw from the chain generator, so the phase of log_every must
    # survive a resume for the resumed run to continue the uninterrupted one
    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rw_mle_iteration"] = self._iteration

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self._iteration = checkpoint.get("rw_mle_iteration", 0)

    def update(self) -> dict[str, float]:
        loss, rewards = self.online_loss() if self.variant == "online" else self.offline_loss()
        self.optimiser_step(loss)
        logs = {"weighted_nll": loss, "weight_ess": 1 / (normalised_weights(rewards, self.kl_weight) / len(rewards)).pow(2).sum()}
        self._iteration += 1
        if self._iteration % self.log_every == 1 or self.log_every == 1:
            # the switch rollouts' rewards are partly the pretrained model's: monitor the policy itself
            with torch.no_grad():
                traj = self.rollout()
                logs.update(reward=self.score_samples(traj.final).mean(), kl_path=traj.path_kl().mean())
        return logs


class OfflineRewardWeightedMLE(RewardWeightedMLE):
    """``variant: offline`` (eq. 26): reward-weighted denoising score matching on data rows;
    no chain is simulated in training, so any sampler evaluates it."""

    needs_stochastic_sampler = False

    def __init__(self, *args, variant: str = "offline", **kw):
        if variant != "offline":
            raise ValueError("method=rw_mle_offline is the offline variant (method=rw_mle is the online one)")
        super().__init__(*args, variant="offline", **kw)
