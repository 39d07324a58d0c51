"""Command-line entry: ``diffusion-rl [group=option ...] [key=value ...]`` (``-m`` for sweeps).

Bad input fails before anything is computed or written, with one ``error: ...`` line that
names the key:

* **A single run**: exit code 2 and nothing created (no run folder, no cache entry). ``main``
  composes the config as Hydra is about to — Hydra's own override parser and config loader —
  and runs every check of validation.py before Hydra starts: unknown group options and keys,
  value types and ranges, incompatible components, folders that cannot be written or read.
  A ``ValueError`` raised while the run builds its components is reported the same way.
* **A sweep** (``-m``): what is wrong with the command as a whole fails it the same way, before
  any job starts: an override Hydra cannot read, an unknown group option in any value of a
  sweep, a job Hydra cannot compose (an unknown key; Hydra composes every job before it
  launches one, so one such job would stop them all), a sweep folder that cannot be created.
  What is wrong with one job's values — a range or a type, a pair of components, its cache or
  data folder — or a ``ValueError`` while it runs fails that job only: ``error: <job>: <message>``
  is printed when it fails (and logged in its folder), the other jobs run to their end, and the
  multirun ends with one line naming the failed jobs and exit code 1. (Hydra, not this module,
  decides what "the other jobs" are: with ``hydra.sweeper.max_batch_size`` set it stops after
  the batch in which a job failed.)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from . import run_folder
from .data.checksums import DataFileError
from .validation import (ConfigError, check, check_group_overrides, check_output_dir, check_paths,
                         check_top_level_key, class_flags, first_line, unknown_key_message)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
log = logging.getLogger(__name__)

# The default run folders (conf/config.yaml) end in the id of the process that started the run:
# two runs started in the same second get two folders (one shared folder would have the second
# continue the first's weights). Cached like ${now:}, so that a sweep's jobs, which Hydra
# composes again (in other processes under joblib), resolve the starting process's value.
OmegaConf.register_new_resolver("diffusion_rl.pid", os.getpid, use_cache=True, replace=True)

#: flags after which Hydra runs no task (it prints help, a config, completions)
_NO_TASK_FLAGS = ("help", "hydra_help", "shell_completion", "cfg", "info")
#: flags that change which config is composed: main's own composition would not be Hydra's
_OTHER_CONFIG_FLAGS = ("config_path", "config_name", "config_dir", "experimental_rerun")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_job(cfg: DictConfig, choices) -> None:
    """The checks of one run's composed config (validation.py), its folders included."""
    check(cfg, choices)
    check_paths(cfg)


class PreRunChecks(Callback):
    """``hydra.callbacks``: checks a single run's config before Hydra creates its folder
    (Hydra makes the job's output folder before it calls the task). ``main`` has run the same
    checks already; this covers a run that Hydra composed differently (``--config-name``)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            _check_job(config, config.hydra.runtime.choices)
            check_output_dir("hydra.run.dir", config.hydra.run.dir)
            # whose folder is it? here, before Hydra opens its log in it (a refused folder
            # stays untouched); the runner asks again for the jobs of a sweep
            extendable = class_flags(config.method, ("extendable",)).get("extendable", True)
            run_folder.claim(config, Path(config.hydra.run.dir), extendable)
        except (ConfigError, run_folder.RunFolderError) as err:
            _fail(str(err))


# ------------------------------------------------------------------ failed jobs of a sweep

#: the failed jobs of this process's sweep: job label -> message
_FAILED_JOBS: dict[str, str] = {}


class JobFailed(CompactHydraException):
    """Raised by a sweep job that failed with one line, so that Hydra records the job as failed
    and goes on with the others; compact, so that when Hydra re-raises it at the end of the
    sweep it prints the message, not a traceback.

    Every instance records itself in ``_FAILED_JOBS``, including the copies that reach the
    process that started the sweep from joblib's workers (an exception is rebuilt from its
    arguments when unpickled): that process names all failed jobs at the end (``main``)."""

    def __init__(self, job: str, message: str):
        super().__init__(job, message)
        self.job, self.message = job, message
        _FAILED_JOBS[job] = message

    def __str__(self) -> str:
        return f"a job of the sweep failed: {self.job}: {self.message}"


def _job_label(hydra_cfg) -> str:
    return hydra_cfg.job.get("override_dirname") or f"job #{hydra_cfg.job.num}"


def _one_line(err: Exception) -> str | None:
    """The message of an expected failure — a range check of a constructor, a missing or altered
    data file, a config check — or ``None`` for anything else (a bug: its traceback is wanted)."""
    if isinstance(err, InstantiationException):  # the same, wrapped by hydra.utils.instantiate
        err = err.__cause__
    if isinstance(err, (ValueError, DataFileError)):
        return str(err)
    return None


def _run(cfg: DictConfig, hydra_cfg, multirun: bool) -> float | None:
    if multirun:  # a sweep job's config exists only now (a single run's was checked before)
        _check_job(cfg, hydra_cfg.runtime.choices)
    import lightning as L  # heavy imports after validation: bad input fails fast
    import torch

    from .runner import run

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the entry point seeds; library code never does
    metrics = run(cfg, Path(hydra_cfg.runtime.output_dir))
    return metrics.get("reward_mean")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _task(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return _run(cfg, hydra_cfg, multirun)
    except Exception as err:
        message = _one_line(err)
        if not multirun:
            if message is None:
                raise
            _fail(message)
        # a sweep job: report it and let Hydra go on with the other jobs (sys.exit here, a
        # SystemExit, would escape Hydra's per-job capture and end the whole sweep)
        job = _job_label(hydra_cfg)
        if message is None:
            log.exception("job %s failed", job)  # the traceback, into the job's log
            message = f"{type(err).__name__}: {err} (traceback in the job's log)"
        else:
            log.error("%s", message)
        print(f"error: {job}: {message}", file=sys.stderr, flush=True)
        raise JobFailed(job, message) from None


# ------------------------------------------------------------------ checks before Hydra starts


def _null_group(arg: str) -> str:
    """``group=null`` -> ``~group``: Hydra 1.3 rejects a null group override on the command
    line, while ``group: null`` in a defaults list means "no option"; both mean the latter."""
    key, _, value = arg.partition("=")
    return f"~{key}" if value == "null" and (CONFIG_DIR / key).is_dir() else arg


def _parse(overrides: list[str], loader=None) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create(config_loader=loader).parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(first_line(err)) from None


def _compose(loader, overrides: list[str], mode: RunMode = RunMode.RUN) -> DictConfig:
    """The config Hydra composes from ``overrides`` (what it runs, or a sweep's master config)."""
    try:
        return loader.load_configuration("config", [*overrides, f"hydra.mode={mode.name}"], run_mode=mode)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_composition_message(err, loader, overrides, mode)) from None


def _composition_message(err: Exception, loader, overrides: list[str], mode: RunMode = RunMode.RUN) -> str:
    """Hydra's report of a config it cannot compose, as one line. An override of a key that does
    not exist (a typo) names the closest key, read from the config composed without it."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key and "not in struct" in str(cause):
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != full_key]
        try:
            cfg = loader.load_configuration("config", rest, run_mode=mode)
        except (HydraException, OmegaConfBaseException):
            cfg = None
        return unknown_key_message(full_key, cfg)
    lines = [line.strip() for text in (str(err), str(cause or "")) for line in text.splitlines() if line.strip()]
    return "; ".join(dict.fromkeys(lines[:2])) or type(err).__name__


def _check_top_level_additions(loader, parsed: list, overrides: list[str]) -> None:
    """``+kl_weight=5``: a new top-level key that no config defines, so nothing reads it.
    Which keys the config files define is read from the config composed without that override."""
    for override in parsed:
        key = override.key_or_group
        if (override.is_add() or override.is_force_add()) and not override.is_hydra_override() \
                and "." not in key and "/" not in key and not (CONFIG_DIR / key).is_dir():
            rest = [o for o in overrides if o != override.input_line]
            check_top_level_key(key, _compose(loader, rest))


def _precheck_run(loader, overrides: list[str]) -> None:
    parsed = _parse(overrides)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps:
        raise ConfigError(f"'{sweeps[0]}' is a sweep: run it with -m (--multirun); a list is key=[a,b]")
    cfg = _compose(loader, overrides)
    HydraConfig.instance().set_config(cfg)  # as Hydra does before a run: ${hydra:...} resolves
    _check_top_level_additions(loader, parsed, overrides)
    _check_job(cfg, cfg.hydra.runtime.choices)
    check_output_dir("hydra.run.dir", cfg.hydra.run.dir)


def _sweep_label(job: list[str], jobs: list[list[str]]) -> str:
    """A job named by the overrides in which it differs from the other jobs of its sweep."""
    varying = [o for o in job if not all(o in other for other in jobs)]
    return " ".join(varying or job)


def _precheck_sweep(loader, overrides: list[str]) -> int | None:
    """Composes every job of the sweep as Hydra's basic sweeper and launchers will (its job
    list, ``load_sweep_config``); returns the number of jobs (``None``: another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    master = _compose(loader, overrides, RunMode.MULTIRUN)
    HydraConfig.instance().set_config(master)
    try:
        sweep_dir = master.hydra.sweep.dir
    except OmegaConfBaseException:
        sweep_dir = None  # it reads something only a job has; Hydra reports it if it must
    if sweep_dir is not None:
        check_output_dir("hydra.sweep.dir", sweep_dir)
    if master.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None  # another sweeper draws its jobs its own way
    params = [f"{k}={v}" for k, v in (master.hydra.sweeper.get("params") or {}).items()]
    try:
        jobs = BasicSweeper.split_arguments(_parse([*params, *master.hydra.overrides.task], loader), None)[0]
    except HydraException as err:  # e.g. interval(): the basic sweeper cannot enumerate it
        raise ConfigError(first_line(err)) from None
    hydra_overrides = list(master.hydra.overrides.hydra)
    failures = {}
    for job in jobs:
        try:
            loader.load_sweep_config(master, list(job))
        except (HydraException, OmegaConfBaseException) as err:
            failures[_sweep_label(job, jobs)] = _composition_message(err, loader, [*hydra_overrides, *job])
    if failures:
        job, message = next(iter(failures.items()))
        # a problem every job has is the command's, not one job's
        same = len(failures) == len(jobs) and len(set(failures.values())) == 1
        raise ConfigError(message if same else f"{job}: {message}")
    if jobs:
        _check_top_level_additions(loader, _parse(list(jobs[0])), [*hydra_overrides, *jobs[0]])
    return len(jobs)


def precheck(argv: list[str]) -> int | None:
    """Everything that can be checked before Hydra starts (module docstring). Returns the
    number of jobs of a sweep when known."""
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.shell_completion:
        return None
    check_group_overrides(args.overrides, CONFIG_DIR)
    if any(getattr(args, flag) for flag in (*_NO_TASK_FLAGS, *_OTHER_CONFIG_FLAGS)):
        return None  # Hydra prints, or composes another config: PreRunChecks and the jobs check
    overrides = [_null_group(arg) for arg in args.overrides]
    multirun = args.multirun or "hydra.mode=MULTIRUN" in overrides
    hydra_config = HydraConfig.instance().cfg  # set while composing, as Hydra does; given back after
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="cli"):
            loader = GlobalHydra.instance().config_loader()
            if multirun:
                return _precheck_sweep(loader, overrides)
            _precheck_run(loader, overrides)
            return None
    finally:
        HydraConfig.instance().cfg = hydra_config


def main() -> None:
    try:
        jobs = precheck(sys.argv[1:])
    except ConfigError as err:
        _fail(str(err))
    sys.argv[1:] = [_null_group(arg) for arg in sys.argv[1:]]
    try:
        _task()
    except SystemExit:
        if not _FAILED_JOBS:
            raise
    if _FAILED_JOBS:  # Hydra has printed the first failure; this names them all
        total = f" of {jobs}" if jobs else ""
        print(f"error: {len(_FAILED_JOBS)}{total} jobs failed: {'; '.join(_FAILED_JOBS)} "
              "(each one's error is above; the other jobs ran to their end)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
