"""The one evaluation routine every method and the pretrained model go through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..core.trajectory import Generation
from .diversity import mean_pairwise_levenshtein
from .metrics import knn_kl, mean_ci95


@dataclass
class EvalConfig:
    """Mirrors ``conf/eval/*.yaml``: ``num_batches`` independent batches of ``batch_size``
    samples; CIs are over the batch statistics (q-learning paper: 100 × 300)."""

    num_batches: int = 100
    batch_size: int = 300
    knn_k: int = 1
    #: data points drawn fresh per batch as the reference sample of the k-NN KL estimate
    data_batch_size: int = 300
    #: samples simulated at once (memory bound for large backbones)
    chunk_size: int = 30000
    #: sequences: mean pairwise Levenshtein distance within each batch (ELEGANT's "Div")
    diversity: bool = True


@torch.no_grad()
def evaluate(generate: Callable[[int, torch.Generator], Generation], reward, cfg: EvalConfig, *,
             generator: torch.Generator, data_generator: torch.Generator, data=None, decode=None,
             true_reward=None) -> tuple[dict[str, float], Tensor, Tensor]:
    """Returns flat metrics, the decoded samples ``[num_batches * batch_size, *E]`` (tokens
    ``[N, L]`` for sequences) and each sample's reward ``[N]``.

    ``generate(n, generator) -> Generation`` is the method's own sampler
    (:meth:`FineTuneMethod.generate`); ``generator`` is passed to it (chain noise, on the
    method's device), ``data_generator`` (CPU) draws the data reference samples.

    * ``reward_mean/_ci95``: reward of each batch, mean and 95% CI over batches;
    * ``reward_true_mean/_ci95``: the same for the genuine reward, when one is given;
    * one ``<term>/_ci95`` per KL term of the generation (``kl_path``: KL between the
      generated and the pretrained chain; ``kl_init``: ELEGANT's learned initial
      distribution, estimated by the path KL of the chain that generates it); ``kl_div``,
      their sum, is ELEGANT's KL-Div, term (b2) of its eq. 5;
    * ``kl_data/_ci95``: k-NN KL(generated ‖ data) per batch, for continuous samples when
      ``data`` can be sampled;
    * ``diversity/_ci95``: mean pairwise Levenshtein distance within a batch, for token samples.
    """
    n = cfg.num_batches * cfg.batch_size
    samples, kl_terms = [], {}
    for start in range(0, n, cfg.chunk_size):
        gen = generate(min(cfg.chunk_size, n - start), generator)
        samples.append(gen.states if decode is None else decode(gen.states))
        for name, values in gen.kl_terms.items():
            kl_terms.setdefault(name, []).append(values)
    x = torch.cat(samples)
    per_sample = reward(x)
    metrics = {"n_samples": n}
    metrics["reward_mean"], metrics["reward_ci95"] = _batch_mean(per_sample, cfg)
    if true_reward is not None:
        metrics["reward_true_mean"], metrics["reward_true_ci95"] = _batch_mean(true_reward(x), cfg)
    for name, chunks in kl_terms.items():
        metrics[name], metrics[f"{name}_ci95"] = _batch_mean(torch.cat(chunks), cfg)
    if kl_terms:
        metrics["kl_div"] = sum(metrics[name] for name in kl_terms)
    tokens = not x.is_floating_point()
    if tokens and cfg.diversity:
        div = torch.tensor([mean_pairwise_levenshtein(b, workers=1) for b in x.reshape(cfg.num_batches, cfg.batch_size, -1).cpu()])
        metrics["diversity"], metrics["diversity_ci95"] = mean_ci95(div)
    if not tokens and data is not None and hasattr(data, "sample"):
        ref = torch.stack([data.sample(cfg.data_batch_size, data_generator) for _ in range(cfg.num_batches)])
        kl_batches = knn_kl(x.reshape(cfg.num_batches, cfg.batch_size, -1).cpu(), ref, cfg.knn_k)
        metrics["kl_data"], metrics["kl_data_ci95"] = mean_ci95(kl_batches)
    return metrics, x, per_sample


def _batch_mean(values: Tensor, cfg: EvalConfig) -> tuple[float, float]:
    """Mean over samples and the 95% CI over the ``num_batches`` batch means."""
    return mean_ci95(values.float().reshape(cfg.num_batches, cfg.batch_size).mean(1))
