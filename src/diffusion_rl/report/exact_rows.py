"""Table rows computed, not sampled: the exact optimum of entropy-regularised fine-tuning.

A row ``{label: Exact optimum, exact_optimum: {alpha: 0.1}}`` of a sequence table reports the
numbers a perfect solver of ELEGANT's control problem would reach (Uehara et al. 2024, Theorem 1):
the tilted distribution ``p_r(x) ∝ exp(r_hat(x) / alpha) p_data(x)`` over **all** ``V^L``
sequences (see :mod:`diffusion_rl.evaluation.exact_optimum`), with ``p_data`` the training
split's empirical distribution smoothed by ``table.exact_optimum_smoothing`` pseudo-counts.

Column keys of the row (same names as a run's ``metrics.json``):

* ``reward_mean`` = ``E_{p_r}[r_hat]`` (nominal reward),
* ``reward_true_mean`` = ``E_{p_r}[r]`` (the task's true reward; absent when it has none),
* ``kl_div`` = ``KL(p_r || p_data)`` (at the optimum the path KL of ELEGANT equals this terminal
  KL, so it sits beside the runs' ``kl_div = kl_path + kl_init``),
* ``diversity`` = ``E_{x, y ~ p_r}[Lev(x, y)]`` (exact for a small support, else estimated from
  ``diversity_samples`` draws), plus ``entropy``, ``diversity_exact``, ``alpha``, ``smoothing``.

:func:`exact_optimum_row` is the pure computation (arrays in, dict out);
:func:`exact_optimum_metrics` builds the arrays from an experiment config (dataset, nominal
reward via ``diffusion_rl.runner.build_reward``, true reward) and caches the row in
``<report_dir>/<table>_exact_alpha<alpha>.json``, keyed by a hash of what it depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ..evaluation.exact_optimum import all_sequences, empirical_log_p_data, exact_optimum_summary, tilted_distribution

__all__ = ["exact_optimum_row", "rewards_on", "exact_optimum_settings", "exact_optimum_metrics", "cache_path"]

DEFAULT_SMOOTHING = 1e-3
DEFAULT_DIVERSITY_SAMPLES = 2000
_VERSION = 1  # bump when the computation changes, to invalidate cached rows


def _tensor(x, dtype=None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def exact_optimum_row(tokens_train, all_tokens, r_hat, r_true, alpha: float, smoothing: float = DEFAULT_SMOOTHING,
                      n_diversity_samples: int = DEFAULT_DIVERSITY_SAMPLES, seed: int = 0, *,
                      max_exact_pairs: int = 2**22, workers: int = -1) -> dict:
    """The exact-optimum row from arrays.

    Args:
        tokens_train: ``[N, L]`` integer tokens of the training split (defines ``p_data``).
        all_tokens: ``[M, L]`` every sequence of the space, each once (:func:`all_sequences`).
        r_hat: ``[M]`` nominal reward of each row of ``all_tokens``.
        r_true: ``[M]`` true reward, or ``None``.
        alpha: KL weight (``0``: the argmax limit).
        smoothing: pseudo-count per sequence of ``p_data`` (:func:`empirical_log_p_data`).
        n_diversity_samples, seed: draws (and their seed) for the diversity estimate when the
            support of ``p_r`` is too large for the exact sum.

    Returns:
        ``reward_mean``, ``reward_true_mean`` (``None`` without ``r_true``), ``kl_div``,
        ``diversity``, ``entropy``, ``diversity_exact`` (bool), ``diversity_n_samples``, ``alpha``,
        ``smoothing``, ``n_sequences``.
    """
    tokens_train, all_tokens = _tensor(tokens_train, torch.long), _tensor(all_tokens, torch.long)
    r_hat = _tensor(r_hat, torch.float64).reshape(-1)
    r_true = None if r_true is None else _tensor(r_true, torch.float64).reshape(-1)
    log_p_data = empirical_log_p_data(tokens_train, all_tokens, smoothing=float(smoothing))
    p = tilted_distribution(log_p_data, r_hat, float(alpha))
    s = exact_optimum_summary(p, r_hat, r_true, log_p_data, all_tokens, n_diversity_samples=int(n_diversity_samples),
                              generator=torch.Generator().manual_seed(int(seed)), max_exact_pairs=max_exact_pairs,
                              workers=workers)
    true = s["reward_true_mean"]
    return {"reward_mean": s["reward_hat_mean"], "reward_true_mean": None if math.isnan(true) else true,
            "kl_div": s["kl_to_data"], "diversity": s["diversity"], "entropy": s["entropy"],
            "diversity_exact": bool(s["diversity_exact"]), "diversity_n_samples": int(s["diversity_n_samples"]),
            "alpha": float(alpha), "smoothing": float(smoothing), "n_sequences": int(all_tokens.shape[0])}


@torch.no_grad()
def rewards_on(reward, tokens: Tensor, chunk: int = 8192) -> Tensor:
    """``float64 [M]``: ``reward(tokens[i:i+chunk])`` chunk by chunk, without gradients, on the
    device of the reward's parameters (CPU when it has none)."""
    device = torch.device("cpu")
    if isinstance(reward, torch.nn.Module):
        reward.eval()
        tensor = next(iter(reward.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(reward.buffers()), None)
        device = tensor.device if tensor is not None else device
    out = []
    for start in range(0, tokens.shape[0], chunk):
        batch = tokens[start:start + chunk]
        out.append(reward(batch.to(device)).detach().double().reshape(batch.shape[0]).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def exact_optimum_settings(cfg: DictConfig, spec) -> dict:
    """A row's settings: ``alpha`` (required), then ``smoothing``, ``diversity_samples`` and
    ``seed`` from the row, else the table's ``exact_optimum_smoothing`` /
    ``exact_optimum_diversity_samples``, else 1e-3 / 2000 / 0."""
    if spec.get("alpha") is None:
        raise ValueError("an exact_optimum row needs alpha (exact_optimum: {alpha: 0.1})")
    table = cfg.table
    return {"alpha": float(spec.alpha),
            "smoothing": float(spec.get("smoothing", table.get("exact_optimum_smoothing", DEFAULT_SMOOTHING))),
            "diversity_samples": int(spec.get("diversity_samples",
                                              table.get("exact_optimum_diversity_samples", DEFAULT_DIVERSITY_SAMPLES))),
            "seed": int(spec.get("seed", 0)),
            # which rows define p_data: the diffusion model's training split, or the whole table
            "p_data": str(spec.get("p_data", table.get("exact_optimum_p_data", "train")))}


def _section(cfg: DictConfig, key: str):
    node = cfg.get(key)
    if node is None:
        return None
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that only resolves inside a run (e.g. hydra:)
        return OmegaConf.to_container(node, resolve=False)


def config_key(cfg: DictConfig, settings: dict) -> str:
    """Hash of what the row depends on: the dataset and reward configs (resolved) and the settings."""
    text = json.dumps({"dataset": _section(cfg, "dataset"), "reward": _section(cfg, "reward"), "settings": settings,
                       "version": _VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cfg: DictConfig, alpha: float, p_data: str = "train") -> Path:
    suffix = "" if p_data == "train" else f"_{p_data}"
    return Path(cfg.paths.report_dir) / f"{cfg.table.name}_exact_alpha{float(alpha):g}{suffix}.json"


def exact_optimum_metrics(cfg: DictConfig, spec) -> dict:
    """The row's metrics for ``spec`` (a row's ``exact_optimum`` block), from the cache when its
    hash matches. Raises ``ValueError`` when the task's space is too large to enumerate."""
    settings = exact_optimum_settings(cfg, spec)
    key = config_key(cfg, settings)
    if settings["p_data"] not in ("train", "full"):
        raise ValueError(f"exact_optimum.p_data must be train or full (got {settings['p_data']!r})")
    path = cache_path(cfg, settings["alpha"], settings["p_data"])
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("hash") == key:
                return cached["metrics"]
        except (json.JSONDecodeError, KeyError):
            pass

    from hydra.utils import instantiate

    dataset = instantiate(cfg.dataset)
    train = dataset.train
    all_tokens = all_sequences(train.length, train.vocab_size)  # ValueError before any reward is built
    from .. import runner  # lazily: the runner pulls in Lightning and every method

    r_hat = rewards_on(runner.build_reward(cfg, dataset), all_tokens)
    true = runner.build_true_reward(cfg, dataset)
    r_true = rewards_on(true, all_tokens) if true is not None else None
    reference_rows = train.tokens if settings["p_data"] == "train" else dataset.full.tokens
    metrics = exact_optimum_row(reference_rows, all_tokens, r_hat, r_true, settings["alpha"], settings["smoothing"],
                                settings["diversity_samples"], settings["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hash": key, "settings": settings, "metrics": metrics}, indent=2))
    return metrics
