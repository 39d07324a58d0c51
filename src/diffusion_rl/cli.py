"""Command-line entry: ``diffusion-rl [group=option ...] [key=value ...]`` (``-m`` for sweeps)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .validation import ConfigError, check, check_group_overrides

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
log = logging.getLogger(__name__)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check(cfg: DictConfig, choices) -> None:
    try:
        check(cfg, choices)
    except ConfigError as err:
        _fail(str(err))


class PreRunChecks(Callback):
    """``hydra.callbacks``: checks a single run's config before Hydra creates its folder
    (Hydra makes the job's output folder before it calls the task)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check(config, config.hydra.runtime.choices)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _task(cfg: DictConfig) -> float | None:
    # again here for the jobs of a sweep (-m), whose configs exist only once a job starts
    _check(cfg, HydraConfig.get().runtime.choices)
    import lightning as L  # heavy imports after validation: bad input fails fast
    import torch

    from .data.checksums import DataFileError
    from .runner import run

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the entry point seeds; library code never does
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, run_dir)
    except (ValueError, DataFileError) as err:  # a range check or a missing / altered data file: one line
        _fail(str(err))
    except InstantiationException as err:  # the same, wrapped by hydra.utils.instantiate
        cause = err.__cause__
        if not isinstance(cause, (ValueError, DataFileError)):
            raise
        _fail(str(cause))
    return metrics.get("reward_mean")


def _null_group(arg: str) -> str:
    """``group=null`` -> ``~group``: Hydra 1.3 rejects a null group override on the command
    line, while ``group: null`` in a defaults list means "no option"; both mean the latter."""
    key, _, value = arg.partition("=")
    return f"~{key}" if value == "null" and (CONFIG_DIR / key).is_dir() else arg


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:], CONFIG_DIR)
    except ConfigError as err:
        _fail(str(err))
    sys.argv[1:] = [_null_group(arg) for arg in sys.argv[1:]]
    _task()


if __name__ == "__main__":
    main()
