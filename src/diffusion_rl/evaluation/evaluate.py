"""The one evaluation routine every method and the pretrained model go through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from hydra.utils import get_class, instantiate
from torch import Tensor

from ..core.trajectory import Generation
from ..logs import Progress
from .metrics import SAMPLE_KINDS, EvalSamples, Metric, ci_key, mean_ci95


@dataclass
class EvalConfig:
    """Mirrors ``eval.metrics`` in ``conf/eval/*.yaml`` (the budget): ``num_batches``
    independent batches of ``batch_size`` samples; CIs are over the batch statistics
    (q-learning paper: 100 × 300)."""

    num_batches: int = 100
    batch_size: int = 300
    knn_k: int = 1
    #: data points drawn fresh per batch as the reference sample of the k-NN KL estimate
    data_batch_size: int = 300
    #: samples simulated at once (memory bound for large backbones)
    chunk_size: int = 30000
    #: images: how many of the samples are written (``samples.npy`` and the ``samples.png`` grid)
    saved_images: int = 64


def sample_kind(dataset) -> str:
    """The kind of sample a data set's runs produce (its ``sample_kind``)."""
    return dataset.sample_kind


def metric_names(compute: Mapping, select: Sequence[str] | None, kind: str) -> list[str]:
    """The names of ``eval.compute`` (name -> ``{_target_: ...}``) a run whose samples are of
    ``kind`` evaluates: every one that reads ``kind`` (``select`` null), or exactly those in
    ``select``, where one that cannot read ``kind`` is a ``ValueError``. Reads only the
    classes' ``kinds``, so a config check can call it before anything is built."""
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"sample kind must be one of {', '.join(SAMPLE_KINDS)} (got {kind!r})")
    kinds = {name: get_class(spec["_target_"]).kinds for name, spec in compute.items() if spec is not None}
    if select is None:
        return [name for name in kinds if kind in kinds[name]]
    for name in select:
        if name not in kinds:
            raise ValueError(f"eval.select: no metric {name!r} in eval.compute (known: {', '.join(kinds)})")
        if kind not in kinds[name]:
            raise ValueError(f"eval.select: metric {name!r} reads {' / '.join(kinds[name])} samples, "
                             f"but this run's samples are {kind}")
    return list(select)


def build_metrics(compute: Mapping, select: Sequence[str] | None, kind: str) -> list[Metric]:
    """The metric objects :func:`metric_names` picks, instantiated (each gets its ``name``)."""
    return [instantiate(compute[name], name=name) for name in metric_names(compute, select, kind)]


@torch.no_grad()
def evaluate(generate: Callable[[int, torch.Generator], Generation], reward, cfg: EvalConfig,
             metrics: Sequence[Metric], *, kind: str, generator: torch.Generator,
             data_generator: torch.Generator, data=None, decode=None,
             true_reward=None) -> tuple[dict[str, float], Tensor, Tensor]:
    """Returns flat metrics, the decoded samples ``[num_batches * batch_size, *E]`` (tokens
    ``[N, L]`` for sequences) and each sample's reward ``[N]``.

    ``generate(n, generator) -> Generation`` is the method's own sampler
    (:meth:`FineTuneMethod.generate`); ``generator`` is passed to it (chain noise, on the
    method's device), ``data_generator`` (CPU) draws the data reference samples.

    ``metrics`` (:func:`build_metrics`) each give ``<name>`` and its ``_ci95``: the mean and
    Student-t 95% half-width over the batches of one statistic per batch; a metric with
    nothing to measure in this run (no genuine reward, no ``kl_init`` term) writes neither.
    """
    n = cfg.num_batches * cfg.batch_size
    keep_states = any(m.needs_states for m in metrics)
    samples, states, kl_terms = [], [], {}
    chunks = range(0, n, cfg.chunk_size)
    progress = Progress("evaluation", len(chunks) + len(metrics))
    for start in chunks:
        gen = generate(min(cfg.chunk_size, n - start), generator)
        progress.step(f"{min(start + cfg.chunk_size, n)}/{n} samples")
        samples.append(gen.states if decode is None else decode(gen.states))
        if keep_states:
            states.append(gen.states)
        for name, values in gen.kl_terms.items():
            kl_terms.setdefault(name, []).append(values)
    x = torch.cat(samples)
    per_sample = reward(x)
    batch = EvalSamples(x=x, kind=kind, rewards=per_sample, kl_terms={k: torch.cat(v) for k, v in kl_terms.items()},
                        cfg=cfg, true_reward=true_reward, data=data, data_generator=data_generator,
                        states=torch.cat(states) if keep_states else None, reward_fn=reward)
    out = {"n_samples": n}
    for metric in metrics:
        values = metric.batch_values(batch)
        if values is not None:
            out[metric.name], out[ci_key(metric.name)] = mean_ci95(values)
        progress.step(metric.name)
    progress.close()
    return out, x, per_sample
