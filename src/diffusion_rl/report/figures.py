"""Paper figures from finished runs: a PNG and a markdown page beside it.

The experiment YAML's ``table.figure`` block says what to draw::

    figure: {kind: density1d | scatter2d, group: <group>, by: method.reward_weight, max_points: 300}

The group's runs are sorted by the ``by`` config value and drawn from their ``samples.npy``
(the first ``max_points`` samples, as the paper plots 300):

* ``density1d``: one axes, a Gaussian KDE (Scott's bandwidth) per run and the exact data
  density ``exp(dataset.log_prob(x))`` dashed (a KDE of data draws if there is none);
* ``scatter2d``: a panel of fresh data draws, then one panel per run, all framed on the data
  (its range padded by half; each title counts the samples outside the frame).

``histogram`` (ELEGANT Fig. 2) reads each run's ``rewards.npy`` (the nominal reward of its
evaluation samples) instead::

    figure: {kind: histogram, group: elegant, by: method.kl_weight, by_label: α,
             extra_groups: [pretrained], bins: 40, seeds: first, layout: overlay}

one histogram (density) per value of ``by`` (label ``α = 0.005``) and per extra group (labelled
by its name), overlaid on one axes (``layout: panels``: one panel each). Several seeds of one
value: ``seeds: first`` (default) draws the lowest seed with ``rewards.npy`` (seed 0), ``seeds: pool``
pools all seeds' rewards. The page lists every run (each seed) with ``columns`` (default
r̂, r (true), Div, KL-Div).

``image_grids`` (the digits figure) draws, per group, the lowest seed's ``samples.npy`` (images
in [0, 1]) as one grid panel titled with its ``label`` and numbers::

    figure: {kind: image_grids, panels: [{group: pretrained, label: Pretrained}, ...], max_images: 64}
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

from ..evaluation.samples import image_grid
from .experiments import Run, collect_runs, fmt


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
    # every panel frames the data (its range, padded by half): a few far-off samples of a
    # diverging run would otherwise shrink every panel's roll to a dot; how many fall
    # outside is in the panel's title
    low, high = data.min(0), data.max(0)
    low, high = low - 0.5 * (high - low), high + 0.5 * (high - low)
    panels = [("data", data), *((f"{label}\nreward {fmt(r.metrics, 'reward_mean')}, "
                                 f"KL(data) {fmt(r.metrics, 'kl_data')}", x) for label, r, x in runs)]
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (title, x) in zip(axes, panels):
        outside = int((((x < low) | (x > high)).any(1)).sum())
        ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.6, color="k" if title == "data" else None)
        ax.set_title(title + (f"\n{outside} of {len(x)} outside this frame" if outside else ""), fontsize=9)
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_aspect("equal", adjustable="box")
        ax.tick_params(labelbottom=True)  # a panel above an empty slot keeps its x labels
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


DRAW = {"density1d": _density1d, "scatter2d": _scatter2d}

HISTOGRAM_COLUMNS = {"reward_mean": "r̂ (nominal)", "reward_true_mean": "r (true)", "diversity": "Div",
                     "kl_div": "KL-Div"}


def _by_value_cells(runs: list[Run], by: str | None) -> list[tuple[object, list[Run]]]:
    """Runs grouped by their ``by`` value (sorted), seeds sorted."""
    cells: list[tuple[object, list[Run]]] = []
    for run in runs:
        value = OmegaConf.select(run.config, by) if by else None
        for v, members in cells:
            if v == value:
                members.append(run)
                break
        else:
            cells.append((value, [run]))
    cells.sort(key=lambda c: (c[0] is None, c[0] if isinstance(c[0], (int, float)) else str(c[0])))
    return [(v, sorted(m, key=lambda r: (r.seed is None, r.seed or 0))) for v, m in cells]


def histogram_data(cfg: DictConfig):
    """What a ``histogram`` figure draws: ``cells`` = ``(label, group, runs)`` (extra groups first,
    then the group's ``by`` values in order; runs sorted by seed), ``drawn`` = ``(label, is_extra,
    rewards, runs drawn)`` and the runs without ``rewards.npy``. ``seeds: first`` draws the
    lowest seed that has ``rewards.npy``; ``seeds: pool`` concatenates every seed's rewards."""
    spec = cfg.table.figure
    by = spec.get("by")
    symbol = spec.get("by_label") or (by.split(".")[-1] if by else "")
    pool = spec.get("seeds", "first")
    if pool not in ("first", "pool"):
        raise ValueError(f"table.figure.seeds must be first | pool (got {pool!r})")
    extras = list(spec.get("extra_groups") or [])
    cells: list[tuple[str, str, list[Run]]] = []
    for group in extras:
        for _, members in _by_value_cells(collect_runs(cfg, group), None):
            cells.append((group, group, members))
    n_extra = len(cells)
    for value, members in _by_value_cells(collect_runs(cfg, spec.group), by):
        cells.append((f"{symbol} = {value}" if by else spec.group, spec.group, members))

    drawn, missing = [], []
    for i, (label, _, members) in enumerate(cells):
        have = [r for r in members if (r.folder / "rewards.npy").exists()]
        missing += [r for r in members if not (r.folder / "rewards.npy").exists()]
        use = have if pool == "pool" else have[:1]
        if use:
            x = np.concatenate([np.load(r.folder / "rewards.npy").astype(np.float64).ravel() for r in use])
            drawn.append((label, i < n_extra, x, use))
    return cells, drawn, missing


def _write_histogram(cfg: DictConfig) -> Path:
    table, spec = cfg.table, cfg.table.figure
    pool = spec.get("seeds", "first")
    layout = spec.get("layout", "overlay")
    if layout not in ("overlay", "panels"):
        raise ValueError(f"table.figure.layout must be overlay | panels (got {layout!r})")
    cells, drawn, missing = histogram_data(cfg)

    out = Path(cfg.paths.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{table.name}.png"
    values = np.concatenate([x for _, _, x, _ in drawn]) if drawn else np.zeros(1)
    edges = np.histogram_bin_edges(values[np.isfinite(values)] if np.isfinite(values).any() else np.zeros(1),
                                   bins=int(spec.get("bins", 40)))
    if layout == "overlay":
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        axes = [ax] * max(len(drawn), 1)
    else:
        ncols = min(max(len(drawn), 1), 4)
        nrows = math.ceil(max(len(drawn), 1) / ncols)
        fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows))
        axes = list(fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel())
    greys, n_grey = ["k", "0.45", "0.65", "0.8"], 0
    for i, (label, extra, x, _) in enumerate(drawn):
        ax = axes[i]
        color = greys[n_grey % len(greys)] if extra else f"C{(i - n_grey) % 10}"
        n_grey += extra
        ax.hist(x, bins=edges, density=True, histtype="stepfilled" if layout == "panels" else "step",
                color=color, alpha=0.6 if layout == "panels" else 1.0, linewidth=1.5, label=label)
        ax.axvline(float(np.mean(x)), color=color, linestyle=":", linewidth=1)
        if layout == "panels":
            ax.set_title(label, fontsize=9)
    for ax in (axes if layout == "panels" else axes[:1]):
        ax.set(xlabel=spec.get("xlabel", "nominal reward r̂"), ylabel="density")
    if layout == "overlay" and drawn:
        axes[0].legend(fontsize=8)
    if not drawn:
        axes[0].text(0.5, 0.5, "no rewards.npy", ha="center", va="center", transform=axes[0].transAxes)
    for ax in axes[len(drawn):] if layout == "panels" else []:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(png, dpi=120, bbox_inches="tight")

    all_runs = [r for _, _, members in cells for r in members]
    used = {id(r) for *_, use in drawn for r in use}
    columns = dict(spec.get("columns") or HISTOGRAM_COLUMNS)
    keys = [k for k in columns if any(k in r.metrics for r in all_runs)]
    how = ("the rewards of all seeds of a value pooled" if pool == "pool" else
           "one run per value, the lowest seed with rewards.npy (seed 0 when it has them)")
    lines = [f"Histograms (densities) of the nominal reward of the evaluation samples (rewards.npy): {how}; "
             "the table lists every run, ✓ = drawn. Dotted lines: means.", "",
             "| " + " | ".join(["Run", "seed", "drawn", *(columns[k] for k in keys)]) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for label, _, members in cells:
        for r in members:
            lines.append("| " + " | ".join([label, str(r.seed), "✓" if id(r) in used else "",
                                            *(fmt(r.metrics, k) for k in keys)]) + " |")
    lines += ["", *([f"No rewards.npy: {', '.join(str(r.folder) for r in missing)}", ""] if missing else [])]
    if not all_runs:
        lines += [f"No finished runs in group {spec.group!r}.", ""]
    return _write_page(cfg, png, lines)


def _write_page(cfg: DictConfig, png: Path, body: list[str]) -> Path:
    """The markdown page beside a figure: title, source, the PNG, ``body``, the notes."""
    table = cfg.table
    lines = [f"# {table.get('title', table.name)}", "", f"Paper: {table.get('source', '—')}", "",
             f"![{table.name}]({png.name})", "", *body]
    if table.get("notes"):
        lines += ["## Notes", "", table.notes.strip(), ""]
    md = png.with_suffix(".md")
    md.write_text("\n".join(lines))
    return md


IMAGE_COLUMNS = {"reward_mean": "r̂ (nominal)", "reward_true_mean": "r (genuine)", "kl_div": "KL",
                 "diversity_features": "Div (features)"}


def _write_image_grids(cfg: DictConfig) -> Path:
    """One panel per ``panels`` entry: the first ``max_images`` images of the lowest seed's
    ``samples.npy`` of its group, titled with its label, r̂, r and KL."""
    table, spec = cfg.table, cfg.table.figure
    n = int(spec.get("max_images", 64))
    drawn, lines = [], ["| " + " | ".join(["Panel", "seed", *IMAGE_COLUMNS.values()]) + " |",
                        "|" + "---|" * (len(IMAGE_COLUMNS) + 2)]
    for panel in spec.panels:
        runs = sorted((r for r in collect_runs(cfg, panel.group) if (r.folder / "samples.npy").exists()),
                      key=lambda r: (r.seed is None, r.seed or 0))
        if not runs:
            lines.append(f"| {panel.label} | — | " + " | ".join("—" for _ in IMAGE_COLUMNS) + " |")
            continue
        run = runs[0]
        drawn.append((panel.label, run, np.load(run.folder / "samples.npy")[:n]))
        lines.append("| " + " | ".join([panel.label, str(run.seed), *(fmt(run.metrics, k) for k in IMAGE_COLUMNS)]) + " |")
    out = Path(cfg.paths.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{table.name}.png"
    ncols = min(max(len(drawn), 1), 4)
    nrows = math.ceil(max(len(drawn), 1) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, run, images) in zip(axes, drawn):
        ax.imshow(image_grid(images), interpolation="nearest")
        ax.set_title(f"{label}\nr̂ {fmt(run.metrics, 'reward_mean')}, r {fmt(run.metrics, 'reward_true_mean')}, "
                     f"KL {fmt(run.metrics, 'kl_div')}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    return _write_page(cfg, png, ["Each panel: the first images of the lowest seed's evaluation samples.", "", *lines, ""])


def write_figure(cfg: DictConfig) -> Path:
    """Draw ``cfg.table.figure`` into ``<report_dir>/<table>.png``; returns the ``.md`` beside it."""
    table, spec = cfg.table, cfg.table.figure
    if spec.kind == "histogram":
        return _write_histogram(cfg)
    if spec.kind == "image_grids":
        return _write_image_grids(cfg)
    if spec.kind not in DRAW:
        raise ValueError(f"table.figure.kind must be {' | '.join([*DRAW, 'histogram', 'image_grids'])} (got {spec.kind!r})")
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
    lines = ["| " + " | ".join([spec.by, *(headers[k] for k in keys)]) + " |", "|" + "---|" * (len(keys) + 1)]
    for r in runs:
        lines.append("| " + " | ".join([str(OmegaConf.select(r.config, spec.by)), *(fmt(r.metrics, k) for k in keys)]) + " |")
    missing = [str(r.folder) for r in runs if not (r.folder / "samples.npy").exists()]
    lines += ["", *([f"Not drawn (no samples.npy): {', '.join(missing)}", ""] if missing else [])]
    if not runs:
        lines += [f"No finished runs in group {spec.group!r}.", ""]
    return _write_page(cfg, png, lines)
