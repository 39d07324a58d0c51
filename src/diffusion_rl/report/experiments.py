"""Run a paper table's grid through Hydra multiruns and turn the run folders into a report.

An experiment YAML (``conf/experiment/<name>.yaml``) holds, next to the run settings it
overlays, a ``table:`` block:

* ``groups``: name → ``overrides`` (list) and optional ``sweep`` (key → list of values).
  Each group is one ``diffusion-rl -m`` multirun into ``<runs_dir>/<table>/<group>/``.
  Finished runs are skipped (``skip_completed``) and killed ones resume from ``last.ckpt``.
* ``rows``: ``label``, ``group``, optional ``target_reward`` (choose the sweep run whose mean
  reward is closest — the calibration of the q-learning paper §6.4) or ``where`` (config
  values the run must have; numbers match within a relative 1e-9, so ``0.3`` finds a run
  whose value was computed as ``0.1 + 0.2``), and ``paper`` (the paper's numbers, cited in
  ``source``). A row may instead be ``exact_optimum: {alpha: …}`` (see ``exact_rows.py``).
* ``columns``: metric keys shown for our runs, with a header each.

Seeds: a group may sweep ``seed`` (``sweep: {seed: [0, 1, 2]}``). The runs of a group that
share every other swept value form one *cell*; a row reports one cell — with several seeds,
the mean over seeds ± a Student-t 95% interval over seeds (:func:`aggregate_seeds`).
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

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
import yaml  # parses override values the way Hydra does (numbers, booleans)

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
            *sweep, *extra, *seed, "skip_completed=true",
            # runs of a sweep side by side, one per core (each uses one torch thread)
            "hydra/launcher=joblib", f"hydra.launcher.n_jobs={cfg.table.get('parallel_jobs', 2)}",
            f"hydra.sweep.dir={runs_folder(cfg) / group}",
            "hydra.sweep.subdir=${hydra.job.override_dirname}",
            "hydra.job.config.override_dirname.exclude_keys="
            "[experiment,method,sampler,skip_completed,paths.runs_dir,paths.cache_dir,paths.report_dir]"]


def run_groups(cfg: DictConfig, extra: list[str] = ()) -> None:
    for group in active_groups(cfg):
        cmd = group_command(cfg, group, extra)
        print(f"[{cfg.table.name}] {group}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})


@dataclass
class Run:
    folder: Path
    config: DictConfig
    metrics: dict


def collect_runs(cfg: DictConfig, group: str) -> list[Run]:
    runs = []
    for metrics_file in sorted((runs_folder(cfg) / group).glob("*/metrics.json")):
        folder = metrics_file.parent
        runs.append(Run(folder, OmegaConf.load(folder / "config.yaml"), json.loads(metrics_file.read_text())))
    return runs


def values_match(value, wanted) -> bool:
    """``where`` equality: numbers within a relative 1e-9 (a number written as text, e.g.
    ``"1e-3"``, counts as that number); booleans only equal booleans; anything else ``==``."""
    def number(v):
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return None
        return None
    if isinstance(value, bool) or isinstance(wanted, bool):
        return type(value) is type(wanted) and value == wanted
    a, b = number(value), number(wanted)
    if a is not None and b is not None and not (isinstance(value, str) and isinstance(wanted, str)):
        return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return value == wanted


def matching_runs(runs: list[Run], where) -> list[Run]:
    where = where or {}
    return [r for r in runs if all(values_match(OmegaConf.select(r.config, k), v) for k, v in where.items())]


def cell_keys(cfg: DictConfig, group: str) -> list[str] | None:
    """The swept keys other than ``seed`` of a group (what tells its cells apart), or ``None``
    when the table does not define the group (then the whole config but the seed does)."""
    spec = cfg.table.get("groups", {}).get(group) if cfg.get("table") is not None else None
    if spec is None:
        return None
    return [k for k in (spec.get("sweep") or {}) if k != "seed"]


def _cell_id(run: Run, keys: list[str] | None) -> str:
    if keys is None:
        container = OmegaConf.to_container(run.config, resolve=False)
        if isinstance(container, dict):
            container.pop("seed", None)
        return json.dumps(container, sort_keys=True, default=str)
    return json.dumps([OmegaConf.select(run.config, k) for k in keys], default=str)


def seed_cells(runs: list[Run], keys: list[str] | None = None) -> list[list[Run]]:
    """Split runs into cells (same values of ``keys``, any seed), in order of first appearance;
    the runs of a cell are sorted by seed."""
    cells: dict[str, dict] = {}
    for run in runs:
        seed = OmegaConf.select(run.config, "seed")
        cell = cells.setdefault(_cell_id(run, keys), {})
        if seed in cell:  # two folders of one setting and seed (e.g. a renamed sweep): keep the first
            log.warning("runs %s and %s share their settings and seed %s; reporting the first",
                        cell[seed].folder, run.folder, seed)
            continue
        cell[seed] = run
    return [sorted(c.values(), key=lambda r: (OmegaConf.select(r.config, "seed") is None,
                                              OmegaConf.select(r.config, "seed") or 0)) for c in cells.values()]


def group_settings(cfg: DictConfig, group: str) -> dict:
    """The config values a group's overrides fix (``key=value`` with a dotted key). Tables that
    share a runs folder (``runs_name``) may add runs with other values to a group's folder; a
    row reports only the runs its own group defines."""
    spec = cfg.table.get("groups", {}).get(group) if cfg.get("table") is not None else None
    fixed = {}
    for override in (spec.get("overrides") or []) if spec is not None else []:
        key, _, value = str(override).partition("=")
        if "." in key and not key.startswith(("hydra", "+", "~")):
            fixed[key] = yaml.safe_load(value)
    return fixed


def select_runs(runs: list[Run], row: DictConfig, keys: list[str] | None = None,
                fixed: dict | None = None) -> list[Run]:
    """The runs (one cell: the seeds of one setting) a row reports: matching the group's fixed
    settings and ``where``, then the cell whose seed-mean reward is closest to
    ``target_reward``. Without a target, several cells are ambiguous: an error asks for ``where``."""
    where = {**(fixed or {}), **OmegaConf.to_container(row.get("where") or OmegaConf.create({}))}
    cells = seed_cells(matching_runs(runs, where), keys)
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


def select_run(runs: list[Run], row: DictConfig) -> Run | None:
    """The run a row reports: matching ``where``, then closest to ``target_reward``."""
    runs = matching_runs(runs, row.get("where"))
    if not runs:
        return None
    if row.get("target_reward") is None:
        return runs[0]
    return min(runs, key=lambda r: abs(r.metrics["reward_mean"] - row.target_reward))


def _ci_key(key: str) -> str:
    return f"{key.removesuffix('_mean')}_ci95"


def aggregate_seeds(runs: list[Run]) -> dict:
    """Metrics of one cell. One run: its own metrics (CIs over its evaluation batches). Several
    runs (seeds): every numeric metric ``k`` becomes the mean over the runs that have it, and its
    CI key (``reward_mean`` → ``reward_ci95``, ``kl_div`` → ``kl_div_ci95``) the half-width of the
    Student-t 95% interval over those runs, ``t_{0.975, n-1} · sd / sqrt(n)`` (sd with ``n - 1``);
    the runs' own evaluation CIs are dropped. Adds ``n_seeds`` and ``seeds``."""
    if not runs:
        return {}
    seeds = [OmegaConf.select(r.config, "seed") for r in runs]
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
                out[_ci_key(key)] = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
            elif have[0].metrics.get(_ci_key(key)) is not None:
                out[_ci_key(key)] = have[0].metrics[_ci_key(key)]  # only one seed has it
        elif values and all(v == values[0] for v in values):
            out[key] = values[0]  # a setting shared by the seeds (e.g. a report key)
    out.update(n_seeds=len(runs), seeds=seeds)
    return out
