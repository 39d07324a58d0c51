"""Markdown reports: our mean ± 95% CI beside the paper's value.

Besides ``groups``/``rows``/``columns`` (see ``experiments.py``), the ``table:`` block may hold:

* rows ``{label, exact_optimum: {alpha, [smoothing, diversity_samples, seed]}, paper}``: the exact
  optimum of the KL-regularised objective over the enumerable space (``exact_rows.py``), with
  ``exact_optimum_smoothing`` (default 1e-3) and ``exact_optimum_diversity_samples`` (2000);
* ``curves``: training curves drawn into ``<table>_curves.png`` and linked (``curves.py``);
* ``calibration_columns``: metric → header of the "All runs of group" sections (default
  reward, KL(data), path KL).

A row whose cell holds several seeds is reported as the mean over seeds ± the Student-t 95%
interval over seeds and labelled ``(n=<seeds>)``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .experiments import Run, active_groups, aggregate_seeds, cell_keys, collect_runs, group_settings, select_runs


def fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "—"
    ci = metrics.get(f"{key.removesuffix('_mean')}_ci95")
    return f"{value:.2f} ± {ci:.3f}" if ci is not None else f"{value:.3g}"


def _show(value) -> str:
    return "—" if value is None else str(value)


def _runs(cfg: DictConfig, cache: dict[str, list[Run]], group: str) -> list[Run]:
    if group not in cache:
        cache[group] = collect_runs(cfg, group)
    return cache[group]


def _exact_row(cfg: DictConfig, row, shows: list[str], cols: list, notes: dict[str, list]) -> tuple[str, list[str]]:
    """Label and cells of an ``exact_optimum`` row; its explanation goes into ``notes``
    (sentence → alphas, so rows differing only in alpha share one note)."""
    from .exact_rows import exact_optimum_metrics, exact_optimum_settings  # torch only when needed

    settings = exact_optimum_settings(cfg, row.exact_optimum)
    alpha = f"{settings['alpha']:g}"
    try:
        metrics = exact_optimum_metrics(cfg, row.exact_optimum)
    except ValueError as err:  # e.g. GFP: V^L is far too many sequences to enumerate
        notes.setdefault(f"{row.label}: not computed ({err})", []).append(alpha)
        metrics = {}
    if metrics:
        how = ("computed exactly" if metrics.get("diversity_exact") else
               f"estimated from {metrics.get('diversity_n_samples')} draws of p_r")
        notes.setdefault(f"{row.label}: the exact optimum p_r ∝ exp(r̂/α) p_data over all {metrics.get('n_sequences')} "
                         f"sequences, p_data = the empirical distribution of "
                         f"{'the training split' if settings.get('p_data', 'train') == 'train' else 'the whole table'}"
                         f" + {settings['smoothing']:g} pseudo-counts per sequence; r̂ and r = E_p_r[r̂] and E_p_r[r], KL-Div = KL(p_r ‖ p_data) (the path KL at "
                         f"the optimum), diversity {how}", []).append(alpha)
    # a shown KL weight is the row's alpha; otherwise the label says it
    shown = [alpha if k.split(".")[-1] in ("kl_weight", "alpha") else "—" for k in shows]
    label = row.label if any(v != "—" for v in shown) else f"{row.label} (α = {alpha})"
    return label, shown + [fmt(metrics, k) for k, _ in cols]


def render_table(cfg: DictConfig) -> str:
    table = cfg.table
    cols = list(table.columns.items())
    paper_cols = list(table.get("paper_columns") or [])
    shows = list(table.get("show_config") or [])
    header = ["Row", *shows, *[f"{h} (ours)" for _, h in cols], *[f"{c} (paper)" for c in paper_cols]]
    lines = [f"# {table.title}", "", f"Paper: {table.source}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cache: dict[str, list[Run]] = {}
    missing, exact_notes, seeded = [], {}, False
    for row in table.rows:
        label = row.label
        if row.get("exact_optimum") is not None:
            label, cells = _exact_row(cfg, row, shows, cols, exact_notes)
        else:
            runs = select_runs(_runs(cfg, cache, row.group), row, cell_keys(cfg, row.group), group_settings(cfg, row.group))
            label += f" (target {row.target_reward:.2f})" if row.get("target_reward") is not None else ""
            if not runs:
                missing.append(row.label)
                cells = ["—"] * (len(shows) + len(cols))
            else:
                metrics = aggregate_seeds(runs)
                if len(runs) > 1:
                    label += f" (n={len(runs)})"
                    seeded = True
                cells = [_show(OmegaConf.select(runs[0].config, k)) for k in shows] + [fmt(metrics, k) for k, _ in cols]
        paper = [str((row.get("paper") or {}).get(c, "—")) for c in paper_cols]
        lines.append("| " + " | ".join([label, *cells, *paper]) + " |")
    lines += ["", *([f"Missing runs: {', '.join(missing)}", ""] if missing else [])]
    if seeded:
        lines += ["Rows marked (n=k): mean over k seeds ± the 95% Student-t interval over seeds (k − 1 degrees "
                  "of freedom); other rows: one run ± the 95% interval over its evaluation batches.", ""]
    for note, alphas in exact_notes.items():
        lines += [f"{note} (α = {', '.join(alphas)}).", ""]
    if table.get("curves") is not None:
        lines += [f"![curves]({table.name}_curves.png)", ""]
    lines += calibration_section(cfg, cache)
    if table.get("notes"):
        lines += ["## Notes", "", table.notes.strip(), ""]
    return "\n".join(lines)


CALIBRATION_COLUMNS = {"reward_mean": "reward", "kl_data": "KL(data)", "kl_path": "path KL"}


def calibration_section(cfg: DictConfig, cache: dict[str, list[Run]]) -> list[str]:
    """Every run of every swept group, so the weight choice can be checked."""
    lines = []
    metric_cols = dict(cfg.table.get("calibration_columns") or CALIBRATION_COLUMNS)
    for group in active_groups(cfg):
        keys = list((cfg.table.groups[group].get("sweep") or {}).keys())
        if not keys:
            continue
        runs = cache.get(group) or collect_runs(cfg, group)
        lines += [f"## All runs of group {group}", "",
                  "| " + " | ".join([*keys, *(str(h) for h in metric_cols.values())]) + " | seconds |",
                  "|" + "---|" * (len(keys) + len(metric_cols) + 1)]
        for run in sorted(runs, key=lambda r: [OmegaConf.select(r.config, k) for k in keys]):
            vals = [_show(OmegaConf.select(run.config, k)) for k in keys]
            m = run.metrics
            lines.append("| " + " | ".join([*vals, *(fmt(m, k) for k in metric_cols),
                                            f"{m.get('wall_seconds', 0):.0f}"]) + " |")
        lines.append("")
    return lines


def write_report(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.report_dir) / f"{cfg.table.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.table.get("curves") is not None:
        from .curves import write_curves  # matplotlib only when needed

        write_curves(cfg)
    out.write_text(render_table(cfg))
    return out
