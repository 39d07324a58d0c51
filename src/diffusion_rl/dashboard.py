"""The dashboards of a run: the Lightning loggers of ``conf/logger/`` and what they receive
once the run is evaluated.

During training every logger gets the curves (``train/*``: reward, genuine reward, KL,
diversity). After the final evaluation, :func:`record_final` gives TensorBoard and W&B what
compares runs side by side:

* TensorBoard: the composed config as hyper-parameters together with the final metrics
  (``final/<metric>``), one hparams session per run, so the HPARAMS tab of ``make dashboard``
  lists every run under ``outputs/`` with its settings and results;
* W&B: the same config as the run's ``config`` and the final metrics in its ``summary``; the
  run's group is the table's name (or a multirun's sweep folder), see ``conf/logger/default.yaml``.

The CSV logger is left alone: its ``metrics.csv`` holds the curves only, and the final numbers
are ``metrics.json``.

W&B never goes online unless asked: ``WANDB_MODE=online`` or a ``WANDB_API_KEY`` makes it
online, ``WANDB_MODE=disabled`` drops it, anything else writes an offline run under
``<run_dir>/wandb/`` (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

#: prefix of the final evaluation's numbers in TensorBoard and W&B (the curves are ``train/*``)
FINAL_PREFIX = "final/"
#: top-level config blocks that describe the report, not the run: only their name is kept
REPORT_BLOCKS = ("table",)
SCALARS = (bool, int, float, str)

log = logging.getLogger(__name__)


def wandb_online() -> bool:
    return os.environ.get("WANDB_MODE") == "online" or bool(os.environ.get("WANDB_API_KEY"))


def _hydra_sweep_dir() -> Path | None:
    """The sweep folder of a multirun job (``hydra.sweep.dir``), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def wandb_names(spec: DictConfig, run_dir: Path) -> dict:
    """W&B's ``group``, ``job_type`` and ``name`` where the YAML leaves them null.

    A table's runs share its name as group (the YAML's ``${oc.select:table.name,null}``); a
    multirun outside a table is grouped by its sweep folder's name. A table's group of runs is
    one multirun into ``<runs>/<table>/<group>/``: that folder's name (``dpok``) is the job type,
    so the W&B table can also be split by it. The run is named after its folder
    (``method.reward_weight=1.0,seed=0`` in a sweep) to match the run folders on disk.
    """
    sweep = _hydra_sweep_dir()
    names = {}
    if spec.get("group") is None and sweep is not None:
        names["group"] = sweep.name
    if spec.get("job_type") is None and sweep is not None and spec.get("group") is not None:
        names["job_type"] = sweep.name
    if spec.get("name") is None:
        names["name"] = run_dir.name
    return names


def _finish_leftover_wandb_run() -> None:
    """A joblib worker runs several jobs of a multirun in one process: a run an earlier job
    left open (it failed before :func:`record_final`) would otherwise be reused by Lightning's
    ``WandbLogger`` and mix two jobs' numbers."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """The loggers of ``cfg.logger`` (an entry set to null is dropped), writing under ``run_dir``."""
    loggers = []
    for name, spec in (cfg.logger or {}).items():
        if spec is None:
            continue
        kw = {"save_dir": str(run_dir)}
        if name == "wandb":
            if os.environ.get("WANDB_MODE") == "disabled":
                # Lightning's offline mode would overwrite WANDB_MODE with "dryrun" and log anyway
                continue
            import wandb

            _finish_leftover_wandb_run()
            kw["offline"] = not wandb_online()
            # wandb's banner, tips and end-of-run summary (a dozen lines per run, in every job
            # of a table) say nothing the run's log does not: record_final logs the one line
            # that matters, where the run is and how to upload it; errors still raise
            kw.setdefault("settings", wandb.Settings(silent=True))
            kw.update(wandb_names(spec, run_dir))
        logger = instantiate(spec, **kw)
        if name == "wandb":
            # Lightning always passes wandb.init an ``anonymous`` argument (None when unset),
            # which wandb >= 0.19 answers with a deprecation warning in every run's log
            init_args = getattr(logger, "_wandb_init", {})
            if init_args.get("anonymous", "") is None:
                del init_args["anonymous"]
        loggers.append(logger)
    return loggers


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def flat_config(cfg: DictConfig) -> dict:
    """The composed config as ``dotted.key -> value``, scalars only (what TensorBoard's hparams
    accept; lists and nulls are left out). A report block (``table``) keeps only its name: its
    rows and the paper's numbers are no setting of the run."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that cannot resolve here (e.g. outside Hydra): as written
        container = OmegaConf.to_container(cfg, resolve=False)
    for block in REPORT_BLOCKS:
        if isinstance(container.get(block), dict):
            container[block] = {"name": container[block].get("name")}
    return {k: v for k, v in _flatten(container).items() if isinstance(v, SCALARS)}


def final_metrics(cfg: DictConfig, metrics: dict) -> dict:
    """The finite numbers of the final evaluation, as ``final/<key>``. Strings and lists (the
    recorded overrides) are no metrics, and ``report_keys`` are config values already logged
    as hyper-parameters."""
    config_keys = set(cfg.get("report_keys") or [])
    return {f"{FINAL_PREFIX}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and k not in config_keys}


def record_final(loggers: list, cfg: DictConfig, metrics: dict) -> None:
    """Give TensorBoard and W&B the run's config and final metrics (after the evaluation,
    before ``metrics.json`` is written). Other loggers are left alone."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    params, finals = flat_config(cfg), final_metrics(cfg, metrics)
    # the final numbers sit at the end of the training curves (the logging step counts iterations)
    step = int(OmegaConf.select(cfg, "method.iterations", default=0) or 0)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            # one hparams session per run: conf/logger sets default_hp_metric false, so the
            # trainer's start-of-fit call wrote none with a placeholder metric
            logger.log_hyperparams(params, metrics=finals, step=step)
            logger.finalize("success")  # flush: the trainer closed its writer, this one is new
        elif isinstance(logger, WandbLogger):
            logger.log_hyperparams(params)
            logger.experiment.summary.update(finals)
            run_files = Path(logger.experiment.dir).parent
            if logger.experiment.offline:
                log.info("W&B: offline run %s (upload it with `wandb sync %s`)", run_files, run_files)
            else:
                log.info("W&B: %s", logger.experiment.url)
            # closed here: the next job of a multirun may run in this same process
            logger.experiment.finish()
