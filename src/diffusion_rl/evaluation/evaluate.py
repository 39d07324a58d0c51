"""The one evaluation routine every method and the pretrained model go through."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.samplers import Policy, Sampler
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


@torch.no_grad()
def evaluate(policy: Policy, sampler: Sampler, reward, cfg: EvalConfig, *, event_shape: tuple[int, ...],
             generator: torch.Generator, reference: Policy | None = None, data=None, decode=None,
             device="cpu") -> tuple[dict[str, float], Tensor]:
    """Returns flat metrics and the decoded samples ``[num_batches * batch_size, *E]``.

    * ``reward_mean/_ci95``: reward of each batch, mean and 95% CI over batches;
    * ``kl_path/_ci95``: KL between the generated and the reference chain (pretrained);
    * ``kl_data/_ci95``: k-NN KL(generated ‖ data) per batch, when ``data`` can be sampled.
    """
    n = cfg.num_batches * cfg.batch_size
    samples, path_kl = [], []
    for start in range(0, n, cfg.chunk_size):
        m = min(cfg.chunk_size, n - start)
        traj = sampler.rollout(policy, m, generator=generator, event_shape=event_shape,
                               reference=reference, device=device)
        samples.append(traj.final if decode is None else decode(traj.final))
        if traj.kl is not None:
            path_kl.append(traj.path_kl())
    x = torch.cat(samples)
    r = reward(x).reshape(cfg.num_batches, cfg.batch_size)
    metrics = {"n_samples": n}
    metrics["reward_mean"], metrics["reward_ci95"] = mean_ci95(r.mean(1))
    if path_kl:
        kl = torch.cat(path_kl).reshape(cfg.num_batches, cfg.batch_size)
        metrics["kl_path"], metrics["kl_path_ci95"] = mean_ci95(kl.mean(1))
    if data is not None and hasattr(data, "sample"):
        ref = torch.stack([data.sample(cfg.data_batch_size, generator) for _ in range(cfg.num_batches)])
        kl_batches = knn_kl(x.reshape(cfg.num_batches, cfg.batch_size, -1).cpu(), ref, cfg.knn_k)
        metrics["kl_data"], metrics["kl_data_ci95"] = mean_ci95(kl_batches)
    return metrics, x
