"""The one evaluation routine every method and the pretrained model go through."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.samplers import Policy, Sampler
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
def evaluate(policy: Policy, sampler: Sampler, reward, cfg: EvalConfig, *, event_shape: tuple[int, ...],
             generator: torch.Generator, reference: Policy | None = None, data=None, decode=None,
             true_reward=None, initial=None, device="cpu") -> tuple[dict[str, float], Tensor, Tensor]:
    """Returns flat metrics, the decoded samples ``[num_batches * batch_size, *E]`` (tokens
    ``[N, L]`` for sequences) and each sample's reward ``[N]``.

    * ``reward_mean/_ci95``: reward of each batch, mean and 95% CI over batches;
    * ``reward_true_mean/_ci95``: the same for the genuine reward, when one is given;
    * ``kl_path/_ci95``: KL between the generated and the reference chain (pretrained);
    * ``kl_init/_ci95``: KL of a learned initial distribution, estimated by the path KL of the
      chain that generates it (``initial(n, generator) -> (x_init, kl [n])``, ELEGANT);
      ``kl_div = kl_path + kl_init`` is ELEGANT's KL-Div, term (b2) of its eq. 5;
    * ``kl_data/_ci95``: k-NN KL(generated ‖ data) per batch, for continuous samples when
      ``data`` can be sampled;
    * ``diversity/_ci95``: mean pairwise Levenshtein distance within a batch, for token samples.
    """
    n = cfg.num_batches * cfg.batch_size
    samples, path_kl, init_kl = [], [], []
    for start in range(0, n, cfg.chunk_size):
        m = min(cfg.chunk_size, n - start)
        x_init = None
        if initial is not None:
            x_init, kl0 = initial(m, generator)
            init_kl.append(kl0)
        traj = sampler.rollout(policy, m, generator=generator, event_shape=event_shape, x_init=x_init,
                               reference=reference, device=device)
        samples.append(traj.final if decode is None else decode(traj.final))
        if traj.kl is not None:
            path_kl.append(traj.path_kl())
    x = torch.cat(samples)
    per_sample = reward(x)
    metrics = {"n_samples": n}
    metrics["reward_mean"], metrics["reward_ci95"] = _batch_mean(per_sample, cfg)
    if true_reward is not None:
        metrics["reward_true_mean"], metrics["reward_true_ci95"] = _batch_mean(true_reward(x), cfg)
    if path_kl:
        metrics["kl_path"], metrics["kl_path_ci95"] = _batch_mean(torch.cat(path_kl), cfg)
        metrics["kl_div"] = metrics["kl_path"]
    if init_kl:
        metrics["kl_init"], metrics["kl_init_ci95"] = _batch_mean(torch.cat(init_kl), cfg)
        metrics["kl_div"] = metrics.get("kl_path", 0.0) + metrics["kl_init"]
    tokens = not x.is_floating_point()
    if tokens and cfg.diversity:
        div = torch.tensor([mean_pairwise_levenshtein(b, workers=1) for b in x.reshape(cfg.num_batches, cfg.batch_size, -1)])
        metrics["diversity"], metrics["diversity_ci95"] = mean_ci95(div)
    if not tokens and data is not None and hasattr(data, "sample"):
        ref = torch.stack([data.sample(cfg.data_batch_size, generator) for _ in range(cfg.num_batches)])
        kl_batches = knn_kl(x.reshape(cfg.num_batches, cfg.batch_size, -1).cpu(), ref, cfg.knn_k)
        metrics["kl_data"], metrics["kl_data_ci95"] = mean_ci95(kl_batches)
    return metrics, x, per_sample


def _batch_mean(values: Tensor, cfg: EvalConfig) -> tuple[float, float]:
    """Mean over samples and the 95% CI over the ``num_batches`` batch means."""
    return mean_ci95(values.float().reshape(cfg.num_batches, cfg.batch_size).mean(1))
