"""Classifier guidance (Dhariwal & Nichol 2021), ELEGANT's "Guidance" baseline (Uehara et al.
2024, App. E.3).

The pretrained diffusion model is left untouched. A time-conditioned binary classifier
``p_phi(y = 1 | x_s, s)`` is trained on noised data ``x_s = alpha(s) x_0 + sigma(s) eps``
(``x_0`` from the data set, ``s ~ U(s_min, T)``, the marginals of the pretrained forward
process), with the label

    y = 1  iff  r_hat(x_0) is in the top ``q`` of r_hat over the data,

and sampling replaces the pretrained score by

    s_guided(x, s) = s_pre(x, s) + gamma * grad_x log p_phi(y = 1 | x, s)
                   = s_pre(x, s) + gamma * grad_x log sigmoid(logit_phi(x, s)).

With ``gamma = 1`` and a calibrated classifier this is Bayes' rule: the score of
``p_s(x | y = 1)``, so the chain samples the data conditioned on being in the top ``q``;
``gamma > 1`` sharpens that (and leaves the model's support faster), ``gamma = 0`` is the
pretrained model. The shared evaluation measures the path KL of the guided chain against
the pretrained one like any other method's.

What the paper leaves unspecified, and our choices
--------------------------------------------------
* The classifier's architecture: an MLP on ``[flatten(x), sinusoidal features of s]``
  (:class:`TimeConditionedClassifier`; widths ``classifier_hidden``, SiLU). It sees the
  whole relaxed one-hot matrix for sequences, like the oracle of Table 5.
* The top-``q`` threshold: the ``(1 - q)`` quantile of ``r_hat`` over ``label_pool`` data rows
  drawn once (first iteration) and stored as a buffer (so a resumed run keeps it). With tied
  rewards (indicator rewards) ``r >= threshold`` may label far more than ``q`` of the data
  (all of it when fewer than ``q`` are rewarded); we then use ``r > threshold`` when that is
  closer to ``q`` and still labels something. A reward constant on the pool cannot be
  labelled and raises.
* No class re-weighting (no ``pos_weight``): the guidance term needs the calibrated posterior
  ``p(y = 1 | x_s)``. Re-weighting the positives by ``w`` makes the classifier estimate
  ``sigmoid(logit + log w)`` instead, whose log-gradient is *not* the posterior's (it only
  shifts the logit by a constant, but ``log sigmoid`` is non-linear), so guidance at a given
  ``gamma`` would no longer mean "condition on y = 1". The imbalance (``q = 0.1``) only makes
  training slower on the rare class; the logged ``classifier_accuracy`` should be read
  against ``1 - positive_fraction``.
* ``gamma`` (``guidance_scale``): not given; 1 (the Bayes-rule value) by default, set per experiment.
* The reward is evaluated on the float data state ``x_0`` (exact one-hot rows for sequences,
  where it equals the reward of the decoded sequence).
* Only score-parametrised processes with Gaussian marginals (OU, VP); the Brownian bridge
  (drift-parametrised, no marginal given the data alone) is rejected.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.processes import ForwardProcess, _bcast
from ..nets import TimeConditionedMLP
from .base import FineTuneMethod

__all__ = ["TimeConditionedClassifier", "ClassifierLogLikelihood", "GuidedScore", "Guidance"]

class TimeConditionedClassifier(TimeConditionedMLP):
    """``(x [B, *E], s [B]) -> logit [B]`` of ``p(y = 1 | x_s = x, s)``: an MLP on
    ``[flatten(x), sinusoidal features of time_scale * s]`` (widths ``hidden``)."""


class ClassifierLogLikelihood(nn.Module):
    """``log p(y = 1 | x, s) = log sigmoid(classifier(x, s))`` ``[B]``."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return F.logsigmoid(self.classifier(x, s))


class GuidedScore(nn.Module):
    """The guided policy ``pretrained(x, s) + gamma * grad_x log p(y | x, s)``, where
    ``log_likelihood(x, s) -> [B]`` is the guidance model's log-likelihood of the wanted
    outcome (:class:`ClassifierLogLikelihood` here; a Gaussian reward model's in
    reward_guidance.py).

    Works under ``torch.no_grad`` (the shared evaluation): the gradient is taken inside
    ``torch.enable_grad`` on a detached copy of ``x``; the output is detached (nothing is
    trained through sampling).
    """

    def __init__(self, pretrained: nn.Module, log_likelihood: nn.Module, guidance_scale: float,
                 process: ForwardProcess):
        super().__init__()
        self.pretrained, self.log_likelihood, self.guidance_scale = pretrained, log_likelihood, float(guidance_scale)
        self.process = process

    def likelihood_grad(self, x: Tensor, s: Tensor) -> Tensor:
        """``grad_x log p(y | x, s)``, ``[B, *E]``."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_likelihood(xg, s).sum(), xg)
        return grad

    def forward(self, x: Tensor, s: Tensor, cond: Any = None) -> Tensor:
        out = self.pretrained(x, s, cond)
        if self.guidance_scale == 0:
            return out.detach()
        # the guidance term is a score: added in score space, handed back in the network's own
        # prediction type (the identity for score networks)
        score = self.process.to_score(x, s, out) + self.guidance_scale * self.likelihood_grad(x, s)
        return self.process.from_score(x, s, score).detach()


class Guidance(FineTuneMethod):
    """Classifier guidance: trains only a noisy-data classifier; ``iterations`` are its
    training steps, each on a fresh data batch of ``batch_size`` with fresh times and noises.

    Extra args (beyond :class:`FineTuneMethod`'s):
        guidance_scale: ``gamma >= 0``.
        top_fraction: ``q in (0, 1)``; ``y = 1`` for the top ``q`` of ``r_hat`` over the data.
        classifier_hidden: hidden widths of the classifier MLP.
        time_scale: scale of the classifier's sinusoidal time features.
        time_dim: number of those features.
        label_pool: data rows drawn once to set the threshold (the ``1 - q`` quantile).
        s_min: smallest noise level trained on (``s ~ U(s_min, T)``).
        activation: ``silu`` or ``relu``.
    """

    fine_tunes = False  # the backbone is untouched: only the classifier trains

    label_threshold: Tensor
    label_strict: Tensor

    def __init__(self, *args, guidance_scale: float = 1.0, top_fraction: float = 0.1,
                 classifier_hidden: Sequence[int] = (256, 256), time_scale: float = 1000.0, time_dim: int = 32,
                 label_pool: int = 10000, s_min: float = 1e-3, activation: str = "silu", **kw):
        super().__init__(*args, **kw)
        if guidance_scale < 0:
            raise ValueError(f"method.guidance_scale must be >= 0 (got {guidance_scale})")
        if not 0 < top_fraction < 1:
            raise ValueError(f"method.top_fraction must be in (0, 1) (got {top_fraction})")
        if int(label_pool) < 1:
            raise ValueError(f"method.label_pool must be >= 1 (got {label_pool})")
        if self.trains_on_data_rows() and (self.dataset is None or not hasattr(self.dataset, "sample")):
            raise ValueError(f"method {type(self).__name__} needs a dataset with sample(n, generator) to train its "
                             f"guidance model (got {type(self.dataset).__name__})")
        process = self.sampler.process
        if process.prediction_type == "drift":
            raise ValueError(f"method guidance needs a network with a score ({type(process).__name__} "
                             "predicts a drift)")
        try:
            process.marginal_coeffs(torch.tensor(float(process.T)))
        except NotImplementedError as e:
            raise ValueError(f"method guidance needs a process with Gaussian marginals: {e}") from None
        if not 0 <= s_min < process.T:
            raise ValueError(f"method.s_min must be in [0, process.T={process.T}) (got {s_min})")
        self.guidance_scale, self.top_fraction = float(guidance_scale), float(top_fraction)
        self.label_pool, self.s_min = int(label_pool), float(s_min)
        # (kept: a subclass may build its guidance model on other features with the same widths)
        self.classifier_args = dict(hidden=classifier_hidden, time_dim=time_dim, time_scale=time_scale,
                                    activation=activation)
        self.classifier = TimeConditionedClassifier(self.backbone.event_shape, **self.classifier_args)
        # the pretrained network is never trained: no optimiser holds it, no gradient reaches it
        self.backbone.requires_grad_(False)
        self.register_buffer("label_threshold", torch.tensor(float("nan")))
        self.register_buffer("label_strict", torch.tensor(False))

    def trains_on_data_rows(self) -> bool:
        """Whether the guidance model is trained on the data set's rows (here: always)."""
        return True

    # --- labels ------------------------------------------------------------------------------
    def _draw_data(self, n: int) -> Tensor:
        return self.dataset.sample(n, self.data_generator).to(self.device, torch.get_default_dtype())

    @torch.no_grad()
    def _rewards(self, x0: Tensor, chunk: int = 4096) -> Tensor:
        return torch.cat([self.reward(x0[i:i + chunk]).reshape(-1) for i in range(0, len(x0), chunk)])

    @torch.no_grad()
    def fit_threshold(self) -> None:
        """Sets ``label_threshold`` (and ``label_strict``) from ``label_pool`` data rows."""
        r = self._rewards(self._draw_data(self.label_pool)).double()
        tau = torch.quantile(r, 1 - self.top_fraction)
        ge, gt = (r >= tau).double().mean().item(), (r > tau).double().mean().item()
        if gt == 0 and ge == 1:
            raise ValueError(f"the reward is constant ({tau.item():.6g}) on {self.label_pool} data rows: "
                             "no top-q labelling for the guidance classifier")
        strict = gt > 0 and abs(gt - self.top_fraction) < abs(ge - self.top_fraction)
        self.label_threshold.fill_(tau.item())
        self.label_strict.fill_(strict)

    def labels(self, rewards: Tensor) -> Tensor:
        """``y`` (float 0/1) for rewards ``[B]``: in the top ``q`` of the data or not."""
        tau = self.label_threshold.to(rewards.dtype)
        return (rewards > tau if bool(self.label_strict) else rewards >= tau).to(torch.get_default_dtype())

    # --- training ----------------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        if torch.isnan(self.label_threshold):
            self.fit_threshold()
        x0 = self._draw_data(self.batch_size)
        y = self.labels(self._rewards(x0))
        u = torch.rand(self.batch_size, generator=self.generator, device=self.device)
        s = self.s_min + u * (self.sampler.process.T - self.s_min)
        alpha, sigma = self.sampler.process.marginal_coeffs(s)
        eps = torch.randn(x0.shape, generator=self.generator, device=self.device)
        xs = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps
        logits = self.classifier(xs, s)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        self.optimiser_step(loss)
        with torch.no_grad():
            accuracy = ((logits > 0).to(y.dtype) == y).to(y.dtype).mean()
        return {"classifier_loss": loss.detach(), "classifier_accuracy": accuracy, "positive_fraction": y.mean()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.classifier.parameters(), lr=self.lr)

    def eval_policy(self) -> GuidedScore:
        return GuidedScore(self.reference, ClassifierLogLikelihood(self.classifier), self.guidance_scale,
                           self.sampler.process)
