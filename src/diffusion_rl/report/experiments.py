"""Run a paper table's grid through Hydra multiruns and turn the run folders into a report.

An experiment YAML (``conf/experiment/<name>.yaml``) holds, next to the run settings it
overlays, a ``table:`` block:

* ``groups``: name → ``overrides`` (list) and optional ``sweep`` (key → list of values).
  Each group is one ``diffusion-rl -m`` multirun into ``<runs_dir>/<table>/<group>/``.
  Finished runs are skipped (``skip_completed``) and killed ones resume from ``last.ckpt``.
* ``rows``: ``label``, ``group``, optional ``target_reward`` (choose the sweep run whose mean
  reward is closest — the calibration of the q-learning paper §6.4) or ``where`` (config
  values the run must have), and ``paper`` (the paper's numbers, cited in ``source``).
* ``columns``: metric keys shown for our runs, with a header each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def load_experiment(name: str, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def _hydra_value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def active_groups(cfg: DictConfig) -> list[str]:
    """Group names; a derived table drops an inherited group by setting it to null."""
    return [name for name, spec in cfg.table.groups.items() if spec is not None]


def group_command(cfg: DictConfig, group: str, extra: list[str] = ()) -> list[str]:
    """The ``diffusion-rl -m`` command line of one group of a table."""
    spec = cfg.table.groups[group]
    sweep = [f"{k}={','.join(_hydra_value(v) for v in vals)}" for k, vals in (spec.get("sweep") or {}).items()]
    return [sys.executable, "-m", "diffusion_rl", "-m", f"experiment={cfg.table.name}", *spec.overrides, *sweep,
            *extra, f"seed={cfg.seed}", "skip_completed=true",
            # runs of a sweep side by side, one per core (each uses one torch thread)
            "hydra/launcher=joblib", f"hydra.launcher.n_jobs={cfg.table.get('parallel_jobs', 2)}",
            f"hydra.sweep.dir={Path(cfg.paths.runs_dir) / cfg.table.name / group}",
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
    for metrics_file in sorted((Path(cfg.paths.runs_dir) / cfg.table.name / group).glob("*/metrics.json")):
        folder = metrics_file.parent
        runs.append(Run(folder, OmegaConf.load(folder / "config.yaml"), json.loads(metrics_file.read_text())))
    return runs


def select_run(runs: list[Run], row: DictConfig) -> Run | None:
    """The run a row reports: matching ``where``, then closest to ``target_reward``."""
    where = row.get("where") or {}
    runs = [r for r in runs if all(OmegaConf.select(r.config, k) == v for k, v in where.items())]
    if not runs:
        return None
    if row.get("target_reward") is None:
        return runs[0]
    return min(runs, key=lambda r: abs(r.metrics["reward_mean"] - row.target_reward))
