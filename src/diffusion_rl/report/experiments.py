"""Run a paper table's grid through Hydra multiruns and turn the run folders into a report.

An experiment YAML (``conf/experiment/<name>.yaml``) holds, next to the run settings it
overlays, a ``table:`` block:

* ``groups``: name → ``overrides`` (list) and optional ``sweep`` (key → list of values).
  Each group is one ``diffusion-rl -m`` multirun into ``<runs_dir>/<table>/<group>/``.
  Finished runs are reused (``skip_completed``) when their recorded config equals the one the
  table asks for now; a changed cell is run anew, its old run moved to ``.replaced/``
  (``replace_changed``, run_folder.py); killed runs resume from ``last.ckpt``. A failing job
  stops neither its group nor the table: the report lists the cells it lacks.
* ``rows``: ``label``, ``group``, optional ``where`` (overrides the run must have been
  launched with, e.g. ``{method.kl_weight: 0.05}``) and ``target_reward`` (of the cells left,
  the one whose mean reward is closest — the calibration of the q-learning paper §6.4), and
  ``paper`` (the paper's numbers, cited in ``source``).
* ``columns``: metric keys shown for our runs, with a header each (a derived table drops an
  inherited column by setting its header to null).

Run selection reads the overrides each run records in its ``metrics.json`` (``overrides``: the
job's ``key=value`` list, as Hydra received it), parsed by Hydra's own override parser: a run
belongs to a row when it was launched with every ``key=value`` of the row's group
(``overrides``) and of its ``where``, compared as parsed values (``0.05`` finds
``method.kl_weight=0.05``; ``true`` is not ``1``). Tables sharing a runs folder (``runs_name``)
therefore report only the runs their own group defines.

Seeds: a group may sweep ``seed`` (``sweep: {seed: [0, 1, 2]}``). The selected runs that share
every other swept value form one *cell*; a row reports one cell — with several seeds, the mean
over seeds ± a Student-t 95% interval over seeds (:func:`aggregate_seeds`). Several cells and
no ``target_reward`` is an error (the row needs a ``where``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def load_experiment(name: str, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def runs_folder(cfg: DictConfig) -> Path:
    """Where a table's groups run: ``<runs_dir>/<table.runs_name or table.name>``. Tables that
    report the same runs (ELEGANT Tables 1 and 3) share a ``runs_name`` and so run them once."""
    return Path(cfg.paths.runs_dir) / cfg.table.get("runs_name", cfg.table.name)


def _hydra_value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def active_groups(cfg: DictConfig) -> list[str]:
    """Group names; a derived table drops an inherited group by setting it to null."""
    return [name for name, spec in cfg.table.groups.items() if spec is not None]


def group_command(cfg: DictConfig, group: str, extra: list[str] = ()) -> list[str]:
    """The ``diffusion-rl -m`` command line of one group of a table."""
    spec = cfg.table.groups[group]
    sweeps = spec.get("sweep") or {}
    sweep = [f"{k}={','.join(_hydra_value(v) for v in vals)}" for k, vals in sweeps.items()]
    # a group sweeping ``seed`` names its seeds itself; otherwise every run uses the table's seed
    seed = [] if "seed" in sweeps else [f"seed={cfg.seed}"]
    return [sys.executable, "-m", "diffusion_rl", "-m", f"experiment={cfg.table.name}", *(spec.get("overrides") or []),
            *sweep, *extra, *seed, "skip_completed=true", "replace_changed=true",
            # runs of a sweep side by side, one per core (each uses one torch thread)
            "hydra/launcher=joblib", f"hydra.launcher.n_jobs={cfg.table.get('parallel_jobs', 2)}",
            f"hydra.sweep.dir={runs_folder(cfg) / group}",
            "hydra.sweep.subdir=${hydra.job.override_dirname}",
            "hydra.job.config.override_dirname.exclude_keys="
            # where files live is no part of a run's name (an absolute data path would be)
            "[experiment,method,sampler,skip_completed,replace_changed,"
            "paths.runs_dir,paths.cache_dir,paths.report_dir,paths.data_dir]"]


def run_groups(cfg: DictConfig, extra: list[str] = ()) -> list[str]:
    """Every group's multirun, one after the other; returns the groups with a failed job
    (the others still run: a table is reported with whatever finished)."""
    failed = []
    for group in active_groups(cfg):
        cmd = group_command(cfg, group, extra)
        print(f"[{cfg.table.name}] {group}: {' '.join(cmd[2:])}", flush=True)
        if subprocess.run(cmd, env=os.environ).returncode != 0:
            print(f"[{cfg.table.name}] {group}: a job failed (its error above); going on with the other groups",
                  file=sys.stderr, flush=True)
            failed.append(group)
    return failed


def group_seeds(cfg: DictConfig, group: str) -> list:
    """The seeds every cell of ``group`` is defined to have (its ``sweep.seed``, else the table's)."""
    spec = _group_spec(cfg, group)
    seeds = (spec.get("sweep") or {}).get("seed") if spec is not None else None
    return list(seeds) if seeds is not None else [cfg.seed]


@dataclass
class Run:
    folder: Path
    config: DictConfig
    metrics: dict
    #: the overrides the run was launched with (``metrics.json["overrides"]``), parsed: key → value
    overrides: dict[str, Any]

    @property
    def seed(self):
        return OmegaConf.select(self.config, "seed")


def parse_overrides(overrides) -> dict[str, Any]:
    """``["k=v", ...]`` → ``{k: value}`` with Hydra's parser (deletions and ``hydra.*`` dropped)."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or []])
    return {o.key_or_group: o.value() for o in parsed if not o.is_delete() and not o.key_or_group.startswith("hydra.")}


def collect_runs(cfg: DictConfig, group: str) -> list[Run]:
    runs = []
    for metrics_file in sorted((runs_folder(cfg) / group).glob("*/metrics.json")):
        folder, metrics = metrics_file.parent, json.loads(metrics_file.read_text())
        if "overrides" not in metrics:
            raise ValueError(f"{folder}: metrics.json records no overrides (finished before runs recorded them); "
                             "delete the folder to rerun it")
        timing = folder / "timing.json"  # wall time, kept apart from the (reproducible) metrics
        if timing.exists():
            metrics = {**metrics, **json.loads(timing.read_text())}
        runs.append(Run(folder, OmegaConf.load(folder / "config.yaml"), metrics, parse_overrides(metrics["overrides"])))
    return runs


def _same(a, b) -> bool:
    return type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else a == b


def matching_runs(runs: list[Run], wanted: dict) -> list[Run]:
    """The runs launched with every ``key=value`` of ``wanted`` (``{key: parsed value}``)."""
    return [r for r in runs if all(k in r.overrides and _same(r.overrides[k], v) for k, v in wanted.items())]


def _group_spec(cfg: DictConfig, group: str):
    return cfg.table.get("groups", {}).get(group) if cfg.get("table") is not None else None


def row_overrides(cfg: DictConfig, group: str, where=None) -> dict[str, Any]:
    """What a run of ``group`` matching ``where`` was launched with: the group's ``overrides``
    and ``where`` (a mapping, values as YAML reads them)."""
    spec = _group_spec(cfg, group)
    wanted = parse_overrides((spec.get("overrides") or []) if spec is not None else [])
    return {**wanted, **(OmegaConf.to_container(where) if OmegaConf.is_config(where) else dict(where or {}))}


def seed_cells(runs: list[Run], keys: list[str]) -> list[list[Run]]:
    """Split runs into cells (same recorded values of ``keys``, any seed), in order of first
    appearance; the runs of a cell are sorted by seed."""
    cells: dict[str, dict] = {}
    for run in runs:
        cell = cells.setdefault(json.dumps([run.overrides.get(k) for k in keys], default=str), {})
        if run.seed in cell:  # two folders of one setting and seed (e.g. a renamed sweep): keep the first
            log.warning("runs %s and %s share their settings and seed %s; reporting the first",
                        cell[run.seed].folder, run.folder, run.seed)
            continue
        cell[run.seed] = run
    return [sorted(c.values(), key=lambda r: (r.seed is None, r.seed or 0)) for c in cells.values()]


def select_runs(cfg: DictConfig, runs: list[Run], row: DictConfig) -> list[Run]:
    """The runs (one cell: the seeds of one setting) a row reports: launched with the group's
    overrides and the row's ``where``, then the cell whose seed-mean reward is closest to
    ``target_reward``. Without a target, several cells are ambiguous: an error asks for ``where``."""
    spec = _group_spec(cfg, row.group)
    keys = [k for k in ((spec.get("sweep") or {}) if spec is not None else {}) if k != "seed"]
    cells = seed_cells(matching_runs(runs, row_overrides(cfg, row.group, row.get("where"))), keys)
    if not cells:
        return []
    if row.get("target_reward") is None:
        if len(cells) > 1:
            raise ValueError(f"table row {row.label!r} matches {len(cells)} settings of group {row.group!r}: "
                             "give it a `where` (e.g. the swept value it reports)")
        return cells[0]

    def distance(cell: list[Run]) -> float:
        rewards = [r.metrics["reward_mean"] for r in cell if r.metrics.get("reward_mean") is not None]
        return abs(sum(rewards) / len(rewards) - row.target_reward) if rewards else math.inf
    return min(cells, key=distance)


def ci_key(key: str) -> str:
    """The interval of a metric: ``reward_mean`` → ``reward_ci95``, ``kl_div`` → ``kl_div_ci95``."""
    return f"{key.removesuffix('_mean')}_ci95"


def fmt(metrics: dict, key: str) -> str:
    """The one format of a metric cell: ``mean ± ci95``, a bare value (3 significant digits)
    when it has no interval, ``—`` when missing."""
    value, ci = metrics.get(key), metrics.get(ci_key(key))
    if value is None:
        return "—"
    return f"{value:.2f} ± {ci:.3f}" if ci is not None else f"{value:.3g}"


def aggregate_seeds(runs: list[Run]) -> dict:
    """Metrics of one cell. One run: its own metrics (CIs over its evaluation batches). Several
    runs (seeds): every numeric metric ``k`` becomes the mean over the runs that have it, and its
    CI key (:func:`ci_key`) the half-width of the Student-t 95% interval over those runs,
    ``t_{0.975, n-1} · sd / sqrt(n)`` (sd with ``n - 1``); the runs' own evaluation CIs are
    dropped. Adds ``n_seeds`` and ``seeds``."""
    if not runs:
        return {}
    seeds = [r.seed for r in runs]
    if len(runs) == 1:
        return {**runs[0].metrics, "n_seeds": 1, "seeds": seeds}
    from scipy.stats import t as student_t

    keys = [k for k in dict.fromkeys(k for r in runs for k in r.metrics) if not k.endswith("_ci95")]
    out: dict = {}
    for key in keys:
        have = [r for r in runs if r.metrics.get(key) is not None]
        values = [r.metrics[key] for r in have]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(values):
            n = len(numbers)
            mean = sum(numbers) / n
            out[key] = mean
            if n > 1:
                sd = math.sqrt(sum((x - mean) ** 2 for x in numbers) / (n - 1))
                out[ci_key(key)] = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
            elif have[0].metrics.get(ci_key(key)) is not None:
                out[ci_key(key)] = have[0].metrics[ci_key(key)]  # only one seed has it
        elif values and all(v == values[0] for v in values):
            out[key] = values[0]  # a setting shared by the seeds (e.g. a report key)
    out.update(n_seeds=len(runs), seeds=seeds)
    return out
