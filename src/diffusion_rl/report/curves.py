"""Training curves of a table's groups, from each run's ``metrics.csv`` (Lightning CSVLogger).

The experiment YAML's ``table.curves`` block::

    curves:
      metrics: {train/reward: "r̂", train/kl_path: "path KL", train/diversity: Div}   # column → panel title
      groups: [ppo_kl, elegant, {group: elegant, where: {method.kl_weight: 0.01}, label: "ELEGANT α=0.01"}]
      band: minmax        # minmax (default) | std | none: the shade around the mean over runs
      smooth: 1           # trailing moving average over this many logged points, per run

draws ``<report_dir>/<table>_curves.png``: one panel per metric, x = ``step``, one line per group
entry — the mean over the entry's runs (seeds, and every swept value unless ``where`` narrows
it: runs are selected as table rows are) at each step, shaded between the runs' min and max (or ± one std). A run lacking a column,
and empty cells (a metric not logged at that step), are skipped; when a step occurs twice the
last value logged at it counts.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # object API, Agg: no pyplot
from omegaconf import DictConfig, OmegaConf

from .experiments import Run, collect_runs, matching_runs, row_overrides

__all__ = ["read_curves", "aggregate_curves", "curve_entries", "write_curves", "curves_path"]


def read_curves(path: Path, x: str = "step") -> dict[str, dict[float, float]]:
    """``column → {x: value}`` of one ``metrics.csv`` (empty / unparsable cells skipped)."""
    out: dict[str, dict[float, float]] = {}
    if not Path(path).exists():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = float(row.get(x) or "nan")
            except ValueError:
                continue
            if math.isnan(step):
                continue
            for key, cell in row.items():
                if key is None or key == x or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    out.setdefault(key, {})[step] = value
    return out


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size == 0:
        return values
    c = np.cumsum(np.r_[0.0, values])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def aggregate_curves(series: list[dict[float, float]], smooth: int = 1) -> dict[str, np.ndarray] | None:
    """Mean, std, min, max and count over runs at each step of the union of their steps."""
    series = [s for s in series if s]
    if not series:
        return None
    smoothed = []
    for s in series:
        steps = np.array(sorted(s))
        smoothed.append(dict(zip(steps.tolist(), _smooth(np.array([s[k] for k in steps]), smooth).tolist())))
    steps = np.array(sorted(set().union(*smoothed)))
    table = np.full((len(smoothed), steps.size), np.nan)
    for i, s in enumerate(smoothed):
        for j, step in enumerate(steps):
            table[i, j] = s.get(step, np.nan)
    count = (~np.isnan(table)).sum(0)
    return {"step": steps, "mean": np.nanmean(table, 0), "std": np.nanstd(table, 0), "min": np.nanmin(table, 0),
            "max": np.nanmax(table, 0), "n": count}


def curve_entries(cfg: DictConfig, cache: dict[str, list[Run]] | None = None) -> list[tuple[str, list[Run]]]:
    """``(label, runs)`` for each item of ``table.curves.groups`` (a group name or
    ``{group, where, label}``)."""
    cache = {} if cache is None else cache
    entries = []
    for item in cfg.table.curves.get("groups") or []:
        if isinstance(item, str):
            group, where, label = item, None, item
        else:
            group, where = item.group, item.get("where")
            label = item.get("label") or (group + "".join(f", {k.split('.')[-1]}={v}" for k, v in (where or {}).items()))
        if group not in cache:
            cache[group] = collect_runs(cfg, group)
        entries.append((label, matching_runs(cache[group], row_overrides(cfg, group, where))))
    return entries


def curves_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.report_dir) / f"{cfg.table.name}_curves.png"


def write_curves(cfg: DictConfig, cache: dict[str, list[Run]] | None = None) -> Path:
    """Draw ``table.curves`` into ``<report_dir>/<table>_curves.png`` and return its path."""
    spec = cfg.table.curves
    metrics = spec.get("metrics")
    if metrics is None:
        raise ValueError("table.curves needs metrics: {column: title, …}")
    metrics = dict(metrics) if OmegaConf.is_dict(metrics) or isinstance(metrics, dict) else {k: k for k in metrics}
    band = spec.get("band", "minmax")
    if band not in ("minmax", "std", "none"):
        raise ValueError(f"table.curves.band must be minmax | std | none (got {band!r})")
    x, smooth = spec.get("x", "step"), int(spec.get("smooth", 1))
    entries = [(label, [read_curves(r.folder / "metrics.csv", x) for r in runs]) for label, runs in curve_entries(cfg, cache)]

    ncols = min(len(metrics), 3) or 1
    nrows = math.ceil(len(metrics) / ncols) or 1
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, title) in zip(axes, metrics.items()):
        drawn = 0
        for i, (label, curves) in enumerate(entries):
            agg = aggregate_curves([c.get(key, {}) for c in curves], smooth)
            if agg is None:
                continue
            n_runs = sum(1 for c in curves if c.get(key))
            color = f"C{i % 10}"
            ax.plot(agg["step"], agg["mean"], color=color, marker="o" if agg["step"].size < 3 else None,
                    label=f"{label} (n={n_runs})" if n_runs > 1 else label)
            if band != "none" and n_runs > 1:
                lo, hi = ((agg["min"], agg["max"]) if band == "minmax" else
                          (agg["mean"] - agg["std"], agg["mean"] + agg["std"]))
                ax.fill_between(agg["step"], lo, hi, color=color, alpha=0.2, linewidth=0)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(str(title), fontsize=10)
        ax.set_xlabel(x)
        if drawn:
            ax.legend(fontsize=8)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = curves_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
