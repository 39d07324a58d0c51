"""Markdown reports: our mean ± 95% CI beside the paper's value."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .experiments import Run, active_groups, collect_runs, select_run


def fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "—"
    ci = metrics.get(f"{key.removesuffix('_mean')}_ci95")
    return f"{value:.2f} ± {ci:.3f}" if ci is not None else f"{value:.3g}"


def _show(value) -> str:
    return "—" if value is None else str(value)


def render_table(cfg: DictConfig) -> str:
    table = cfg.table
    cols = list(table.columns.items())
    paper_cols = list(table.paper_columns)
    shows = list(table.get("show_config") or [])
    header = ["Row", *shows, *[f"{h} (ours)" for _, h in cols], *[f"{c} (paper)" for c in paper_cols]]
    lines = [f"# {table.title}", "", f"Paper: {table.source}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cache: dict[str, list[Run]] = {}
    missing = []
    for row in table.rows:
        runs = cache.setdefault(row.group, collect_runs(cfg, row.group))
        run = select_run(runs, row)
        label = row.label + (f" (target {row.target_reward:.2f})" if row.get("target_reward") is not None else "")
        if run is None:
            missing.append(row.label)
            cells = ["—"] * (len(shows) + len(cols))
        else:
            cells = [_show(OmegaConf.select(run.config, k)) for k in shows] + [fmt(run.metrics, k) for k, _ in cols]
        paper = [str((row.get("paper") or {}).get(c, "—")) for c in paper_cols]
        lines.append("| " + " | ".join([label, *cells, *paper]) + " |")
    lines += ["", *([f"Missing runs: {', '.join(missing)}", ""] if missing else [])]
    lines += calibration_section(cfg, cache)
    if table.get("notes"):
        lines += ["## Notes", "", table.notes.strip(), ""]
    return "\n".join(lines)


def calibration_section(cfg: DictConfig, cache: dict[str, list[Run]]) -> list[str]:
    """Every run of every swept group, so the weight choice can be checked."""
    lines = []
    for group in active_groups(cfg):
        keys = list((cfg.table.groups[group].get("sweep") or {}).keys())
        if not keys:
            continue
        runs = cache.get(group) or collect_runs(cfg, group)
        lines += [f"## All runs of group {group}", "", "| " + " | ".join(keys) + " | reward | KL(data) | path KL | seconds |",
                  "|" + "---|" * (len(keys) + 4)]
        for run in sorted(runs, key=lambda r: [OmegaConf.select(r.config, k) for k in keys]):
            vals = [_show(OmegaConf.select(run.config, k)) for k in keys]
            m = run.metrics
            lines.append("| " + " | ".join([*vals, fmt(m, "reward_mean"), fmt(m, "kl_data"), fmt(m, "kl_path"),
                                            f"{m.get('wall_seconds', 0):.0f}"]) + " |")
        lines.append("")
    return lines


def write_report(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.report_dir) / f"{cfg.table.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_table(cfg))
    return out
