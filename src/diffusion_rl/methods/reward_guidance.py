"""Guidance by a Gaussian reward model: ELEGANT's image "Guidance" baseline (App. E.3, F.2.1;
METHODS_SPEC §3.3), the continuous-target sibling of the top-q classifier of guidance.py.

A regressor ``mu_phi(x_s, s)`` of the reward is trained on noised clean samples: the model
``p(y | x_s) = N(y; mu_phi(x_s, s), 1/gamma)`` and Bayes' rule for "the reward is ``y``" give

    s_guided(x, s) = s_pre(x, s) + gamma * grad_x log N(y; mu_phi(x, s), 1/gamma)-kernel
                   = s_pre(x, s) - gamma * grad_x (mu_phi(x, s) - y)^2 / 2,

i.e. in epsilon form ``eps_cfg + gamma * sigma(s) * grad_x (mu - y)^2 / 2``: the public code's
rule with ``gamma = 1/sigma^2``. Table 9's grid is (target ``y``, level ``gamma``).

What differs from the paper, and why
------------------------------------
* Training rows: the paper's regressor was trained on AVA (> 250k photographs, VAE-encoded),
  labelled by the aesthetic score. AVA is not available here, so ``data_source: pretrained``
  trains on ``label_pool`` samples of the pretrained model itself (generated once, first
  iteration), labelled by the reward; ``data_source: dataset`` uses the data set's rows (the
  digits). Labels get ``N(0, label_noise^2)`` as in the public code.
* Noise levels: one of the sampler's own timesteps per row (the code: one of the 50 DDIM steps).
* The public code's loss is torch's ``MSELoss`` (a batch mean), so its per-sample gradient is
  divided by the batch size (2 by default); here ``gamma`` multiplies the per-sample gradient:
  the code's ``gamma`` is ours times 2 at its batch size.
* Features: ``flat`` (an MLP on ``[flatten(x), time features]``, small states) or
  ``reward_embedding`` (the reward's own image embedding of the decoded noisy state, e.g. the
  L2-normalised CLIP features of the aesthetic reward, then the MLP — the paper's choice).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.processes import _bcast
from ..nets import TimeConditionedMLP
from .guidance import Guidance, GuidedScore

__all__ = ["EmbeddingRegressor", "GaussianLogLikelihood", "RewardModelGuidance"]

FEATURES = ("flat", "reward_embedding")


class EmbeddingRegressor(nn.Module):
    """``mu(x, s)``: an MLP on ``[embed(decode(x)), time features of s]``. ``embed`` and
    ``decode`` belong to other modules (the reward, the backbone): held as plain functions,
    not submodules, so they are neither trained nor saved twice."""

    def __init__(self, embed, decode, embed_dim: int, *, hidden: Sequence[int], time_dim: int, time_scale: float,
                 activation: str):
        super().__init__()
        object.__setattr__(self, "_features", lambda x: embed(decode(x)))
        self.mlp = TimeConditionedMLP((int(embed_dim),), hidden, time_dim, time_scale, activation)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return self.mlp(self._features(x), s)


class GaussianLogLikelihood(nn.Module):
    """``-(mu(x, s) - y)^2 / 2`` ``[B]``: the Gaussian reward model's log-likelihood of the
    target ``y`` at unit precision (``gamma`` scales it in :class:`GuidedScore`)."""

    def __init__(self, regressor: nn.Module, target: float):
        super().__init__()
        self.regressor, self.target = regressor, float(target)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return -0.5 * (self.regressor(x, s) - self.target) ** 2


class RewardModelGuidance(Guidance):
    """Extra args (beyond :class:`Guidance`'s, whose ``top_fraction`` it does not use):
        target: ``y``, the reward the chain is conditioned on.
        label_noise: std of the Gaussian noise added to the training labels.
        data_source: ``pretrained`` (samples of the pretrained model) or ``dataset`` (its rows).
        features: ``flat`` or ``reward_embedding`` (needs ``reward.embed`` and ``embed_dim``).
        embed_dim: the reward embedding's dimension (768 for CLIP ViT-L/14).
    """

    pool: Tensor
    pool_rewards: Tensor

    def __init__(self, *args, target: float = 6.0, label_noise: float = 0.1, data_source: str = "pretrained",
                 features: str = "flat", embed_dim: int | None = None, **kw):
        if data_source not in ("pretrained", "dataset"):
            raise ValueError(f"method.data_source must be pretrained or dataset (got {data_source!r})")
        if features not in FEATURES:
            raise ValueError(f"method.features must be one of {', '.join(FEATURES)} (got {features!r})")
        if label_noise < 0:
            raise ValueError(f"method.label_noise must be >= 0 (got {label_noise})")
        self.data_source = data_source
        super().__init__(*args, **kw)
        self.target, self.label_noise = float(target), float(label_noise)
        if features == "reward_embedding":
            if not hasattr(self.reward, "embed") or embed_dim is None:
                raise ValueError("method.features=reward_embedding needs a reward with an embed() (e.g. "
                                 "reward=laion_aesthetic) and method.embed_dim")
            self.classifier = EmbeddingRegressor(self.reward.embed, self.decode, embed_dim, **self.classifier_args)
        # the training rows, drawn (or generated) once at the first iteration; buffers, so a
        # resumed run trains on the same rows
        self.register_buffer("pool", torch.empty(0))
        self.register_buffer("pool_rewards", torch.empty(0))

    def trains_on_data_rows(self) -> bool:
        return self.data_source == "dataset"

    # --- the training rows -------------------------------------------------------------------
    @torch.no_grad()
    def fit_threshold(self) -> None:
        """No threshold: the first iteration draws the training rows and their noisy labels."""
        if self.data_source == "dataset":
            pool = self._draw_data(self.label_pool)
        else:
            rollouts = -(-self.label_pool // self.batch_size)  # whole training-size batches of chains
            pool = torch.cat([self.rollout(self.reference, with_reference=False).final
                              for _ in range(rollouts)])[:self.label_pool]
        rewards = self._rewards(self.decode(pool))
        noise = torch.randn(rewards.shape, generator=self.generator, device=self.device)
        self.pool, self.pool_rewards = pool, rewards + self.label_noise * noise
        self.label_threshold.fill_(0.0)  # marks the rows as drawn (the base class's flag)

    def update(self) -> dict[str, float]:
        if torch.isnan(self.label_threshold):
            self.fit_threshold()
        rows = torch.randint(0, len(self.pool), (self.batch_size,), generator=self.data_generator)
        x0, y = self.pool[rows.to(self.pool.device)], self.pool_rewards[rows.to(self.pool.device)]
        times = self.sampler.times[:-1]  # the noise levels the chain visits
        k = torch.randint(0, len(times), (self.batch_size,), generator=self.data_generator)
        s = times[k].to(self.device, x0.dtype)
        alpha, sigma = self.sampler.process.marginal_coeffs(s)
        eps = torch.randn(x0.shape, generator=self.generator, device=self.device)
        xs = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps
        loss = F.mse_loss(self.classifier(xs, s), y)
        self.optimiser_step(loss)
        return {"regressor_loss": loss.detach(), "label_mean": y.mean()}

    def eval_policy(self) -> GuidedScore:
        return GuidedScore(self.reference, GaussianLogLikelihood(self.classifier, self.target), self.guidance_scale,
                           self.sampler.process)
