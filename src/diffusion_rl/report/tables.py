"""Markdown reports: our mean ± 95% CI beside the paper's value.

Besides ``groups``/``rows``/``columns`` (see ``experiments.py``), the ``table:`` block may hold:

* ``curves``: training curves drawn into ``<table>_curves.png`` and linked (``curves.py``);
* ``calibration_columns``: metric → header of the "All runs of group" sections (default
  reward, KL(data), path KL).

A row whose cell holds several seeds is reported as the mean over seeds ± the Student-t 95%
interval over seeds and labelled ``(n=<seeds>)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .claims import check_claims, render_claims
from .experiments import Run, active_groups, aggregate_seeds, collect_runs, fmt, group_seeds, select_runs


def _show(value) -> str:
    return "—" if value is None else str(value)


def _runs(cfg: DictConfig, cache: dict[str, list[Run]], group: str) -> list[Run]:
    if group not in cache:
        cache[group] = collect_runs(cfg, group)
    return cache[group]


def render_table(cfg: DictConfig) -> str:
    table = cfg.table
    cols = [(k, h) for k, h in table.columns.items() if h is not None]  # null: dropped by a derived table
    paper_cols = list(table.get("paper_columns") or [])
    shows = list(table.get("show_config") or [])
    header = ["Row", *shows, *[f"{h} (ours)" for _, h in cols], *[f"{c} (paper)" for c in paper_cols]]
    lines = [f"# {table.title}", "", f"Paper: {table.source}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cache: dict[str, list[Run]] = {}
    missing, seeded = [], False
    row_metrics: dict[str, dict] = {}
    for row in table.rows:
        runs = select_runs(cfg, _runs(cfg, cache, row.group), row)
        label = row.label + (f" (target {row.target_reward:.2f})" if row.get("target_reward") is not None else "")
        where = row.get("where") or {}
        # the seeds the row stands for: its group's, or the one its `where` picks
        wanted = [where["seed"]] if "seed" in where else group_seeds(cfg, row.group)
        absent = [s for s in wanted if s not in {r.seed for r in runs}]
        if not runs:
            missing.append(f"{row.label} (no run)")
            cells = ["—"] * (len(shows) + len(cols))
        elif absent:  # never a mean over fewer seeds than the group defines, unmarked
            missing.append(f"{row.label} (seed {', '.join(map(str, absent))} of {', '.join(map(str, wanted))} missing)")
            label += " (incomplete)"
            cells = ["—"] * (len(shows) + len(cols))
        else:
            metrics = aggregate_seeds(runs)
            row_metrics[row.label] = metrics
            if len(runs) > 1:
                label += f" (n={len(runs)})"
                seeded = True
            cells = [_show(OmegaConf.select(runs[0].config, k)) for k in shows] + [fmt(metrics, k) for k, _ in cols]
        row_metrics.setdefault(row.label, {})
        paper = [str((row.get("paper") or {}).get(c, "—")) for c in paper_cols]
        lines.append("| " + " | ".join([label, *cells, *paper]) + " |")
    lines += ["", *([f"**Missing cells** (a failed or unfinished job; rerun the table to fill them): "
                     f"{'; '.join(missing)}", ""] if missing else [])]
    if seeded:
        lines += ["Rows marked (n=k): mean over k seeds ± the 95% Student-t interval over seeds (k − 1 degrees "
                  "of freedom); other rows: one run ± the 95% interval over its evaluation batches.", ""]
    claims = check_claims(table, row_metrics)
    lines += render_claims(claims)
    if table.get("curves") is not None:
        lines += [f"![curves]({table.name}_curves.png)", ""]
    lines += calibration_section(cfg, cache)
    if table.get("notes"):
        lines += ["## Notes", "", table.notes.strip(), ""]
    return "\n".join(lines), claims


CALIBRATION_COLUMNS = {"reward_mean": "reward", "kl_data": "KL(data)", "kl_path": "path KL"}


def calibration_section(cfg: DictConfig, cache: dict[str, list[Run]]) -> list[str]:
    """Every run of every swept group, so the weight choice can be checked."""
    lines = []
    metric_cols = {k: h for k, h in (cfg.table.get("calibration_columns") or CALIBRATION_COLUMNS).items() if h is not None}
    for group in active_groups(cfg):
        keys = list((cfg.table.groups[group].get("sweep") or {}).keys())
        if not keys:
            continue
        lines += [f"## All runs of group {group}", "",
                  "| " + " | ".join([*keys, *(str(h) for h in metric_cols.values())]) + " | seconds |",
                  "|" + "---|" * (len(keys) + len(metric_cols) + 1)]
        for run in sorted(_runs(cfg, cache, group), key=lambda r: [OmegaConf.select(r.config, k) for k in keys]):
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
    text, claims = render_table(cfg)
    out.write_text(text)
    (out.parent / f"{cfg.table.name}.claims.json").write_text(json.dumps(claims, indent=2))
    return out
