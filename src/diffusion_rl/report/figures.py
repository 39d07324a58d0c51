"""Paper figures from finished runs: a PNG and a markdown page beside it.

The experiment YAML's ``table.figure`` block says what to draw::

    figure: {kind: density1d | scatter2d, group: <group>, by: method.reward_weight, max_points: 300}

The group's runs are sorted by the ``by`` config value and drawn from their ``samples.npy``
(the first ``max_points`` samples, as the paper plots 300):

* ``density1d``: one axes, a Gaussian KDE (Scott's bandwidth) per run and the exact data
  density ``exp(dataset.log_prob(x))`` dashed (a KDE of data draws if there is none);
* ``scatter2d``: a panel of fresh data draws, then one panel per run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from matplotlib.figure import Figure  # the object API renders with Agg: no pyplot, no display
from omegaconf import DictConfig, OmegaConf
from scipy.stats import gaussian_kde

from .experiments import Run, collect_runs


def _fmt(metrics: dict, key: str) -> str:
    """``mean ± ci95``; the CI of ``reward_mean`` is stored as ``reward_ci95`` (evaluate.py)."""
    value, ci = metrics.get(key), metrics.get(f"{key.removesuffix('_mean')}_ci95")
    if value is None:
        return "—"
    return f"{value:.2f} ± {ci:.3f}" if ci is not None else f"{value:.3g}"


def _short(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "—" if value is None else f"{value:.2f}"


def _density1d(runs: list[tuple[str, Run, np.ndarray]], dataset, data: np.ndarray) -> Figure:
    points = np.concatenate([data.ravel(), *(x.ravel() for _, _, x in runs)])
    pad = 0.1 * (points.max() - points.min()) + 1e-3
    grid = np.linspace(points.min() - pad, points.max() + pad, 500)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for label, _, x in runs:
        ax.plot(grid, gaussian_kde(x.ravel()).evaluate(grid), label=label)
    if hasattr(dataset, "log_prob"):
        density = dataset.log_prob(torch.from_numpy(grid).unsqueeze(-1)).exp().numpy()
        ax.plot(grid, density, "k--", label="data (exact)")
    else:
        ax.plot(grid, gaussian_kde(data.ravel()).evaluate(grid), "k--", label="data (KDE)")
    ax.set(xlabel="x", ylabel="density")
    ax.legend()
    return fig


def _scatter2d(runs: list[tuple[str, Run, np.ndarray]], dataset, data: np.ndarray) -> Figure:
    panels = [("data", data), *((f"{label}\nreward {_short(r.metrics, 'reward_mean')}, "
                                 f"KL(data) {_short(r.metrics, 'kl_data')}", x) for label, r, x in runs)]
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (title, x) in zip(axes, panels):
        ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.6, color="k" if title == "data" else None)
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal", adjustable="box")
        ax.tick_params(labelbottom=True)  # a panel above an empty slot keeps its x labels
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


DRAW = {"density1d": _density1d, "scatter2d": _scatter2d}


def write_figure(cfg: DictConfig) -> Path:
    """Draw ``cfg.table.figure`` into ``<report_dir>/<table>.png``; returns the ``.md`` beside it."""
    table, spec = cfg.table, cfg.table.figure
    if spec.kind not in DRAW:
        raise ValueError(f"table.figure.kind must be {' | '.join(DRAW)} (got {spec.kind!r})")
    n = int(spec.get("max_points", 300))
    name = spec.by.split(".")[-1]
    runs = sorted(collect_runs(cfg, spec.group), key=lambda r: OmegaConf.select(r.config, spec.by))
    drawn = [(f"{name}={OmegaConf.select(r.config, spec.by)}", r, np.load(r.folder / "samples.npy")[:n])
             for r in runs if (r.folder / "samples.npy").exists()]
    dataset = instantiate(cfg.dataset)
    data = dataset.sample(n, torch.Generator().manual_seed(0)).numpy()

    out = Path(cfg.paths.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{table.name}.png"
    DRAW[spec.kind](drawn, dataset, data).savefig(png, dpi=120, bbox_inches="tight")

    keys = [k for k in ("reward_mean", "kl_data", "kl_path") if any(k in r.metrics for r in runs)]
    headers = {"reward_mean": "reward", "kl_data": "KL(data)", "kl_path": "path KL"}
    lines = [f"# {table.get('title', table.name)}", "", f"Paper: {table.get('source', '—')}", "",
             f"![{table.name}]({png.name})", "",
             "| " + " | ".join([spec.by, *(headers[k] for k in keys)]) + " |", "|" + "---|" * (len(keys) + 1)]
    for r in runs:
        lines.append("| " + " | ".join([str(OmegaConf.select(r.config, spec.by)), *(_fmt(r.metrics, k) for k in keys)]) + " |")
    missing = [str(r.folder) for r in runs if not (r.folder / "samples.npy").exists()]
    lines += ["", *([f"Not drawn (no samples.npy): {', '.join(missing)}", ""] if missing else [])]
    if not runs:
        lines += [f"No finished runs in group {spec.group!r}.", ""]
    if table.get("notes"):
        lines += ["## Notes", "", table.notes.strip(), ""]
    md = out / f"{table.name}.md"
    md.write_text("\n".join(lines))
    return md
