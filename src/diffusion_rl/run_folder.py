"""A run folder belongs to one run.

A folder's ``config.yaml`` records the run it holds. Starting a run in a folder that holds
another config would continue the other run's weights and relabel its results, so
:func:`claim` compares the two first — before anything is computed or written:

* no ``config.yaml``: a new run;
* the same config: the same run — finished (``metrics.json``: reused when ``skip_completed``)
  or interrupted (resumed from ``last.ckpt``);
* the same config but more ``method.iterations`` (an *extension*): the finished run goes on
  from its ``last.ckpt``; its shorter run's ``metrics.json`` is kept as
  ``metrics.iterations-<n>.json`` (methods whose stages are shares of the budget, ELEGANT,
  declare ``extendable = False``: more iterations would move their stage boundaries);
* anything else: refused with one line (:class:`RunFolderError`), every file untouched —
  unless ``replace_changed=true`` (what tables pass, so that editing a table's YAML reruns
  exactly the cells it changed): the old run is moved to ``<parent>/.replaced/<name>-<time>/``.

Keys that do not change what a run computes (where its files go, how it is logged, the
table block that only shapes the report) are left out of the comparison.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

#: top-level keys that do not change what a run computes
NEUTRAL_KEYS = ("table", "paths", "skip_completed", "replace_changed", "logger", "dashboard")
#: keys a finished run may be continued with, when the new value is larger
EXTENSION_KEYS = ("method.iterations",)
#: files a running Hydra job already holds open in its folder (its log): copied, not moved
OPEN_FILE_SUFFIXES = (".log",)


class RunFolderError(ValueError):
    """A run folder that holds another run."""


@dataclass
class Claim:
    #: "new" | "same" | "extension"
    kind: str
    finished: bool


def defining_config(cfg: DictConfig) -> dict:
    """What a run computes from: the config without :data:`NEUTRAL_KEYS` (interpolations
    kept as written, so the recorded file and the composed config compare like for like)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in container.items() if k not in NEUTRAL_KEYS and k != "hydra"}


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """``dotted key -> (recorded value, current value)`` for every key that differs."""
    old, new = _flatten(recorded), _flatten(current)
    missing = object()
    return {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)}


def _describe(diff: dict[str, tuple], limit: int = 3) -> str:
    def show(v):
        return "(absent)" if not isinstance(v, (str, int, float, bool, list, type(None), dict)) else repr(v)
    parts = [f"{k}: {show(a)} -> {show(b)}" for k, (a, b) in list(diff.items())[:limit]]
    more = f", and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(parts) + more


def _is_extension(diff: dict[str, tuple]) -> bool:
    return bool(diff) and all(k in EXTENSION_KEYS and isinstance(a, int) and isinstance(b, int) and b > a
                              for k, (a, b) in diff.items())


def claim(cfg: DictConfig, run_dir: Path, extendable: bool = True) -> Claim:
    """Decide what starting ``cfg`` in ``run_dir`` means (module docstring); raises
    :class:`RunFolderError` for a folder of another run. Writes nothing, except the move of
    a changed run under ``replace_changed``."""
    recorded_file = run_dir / "config.yaml"
    if not recorded_file.exists():
        return Claim("new", finished=False)
    finished = (run_dir / "metrics.json").exists()
    diff = differences(defining_config(OmegaConf.load(recorded_file)), defining_config(cfg))
    if not diff:
        return Claim("same", finished=finished)
    if _is_extension(diff) and extendable:
        return Claim("extension", finished=finished)
    if cfg.get("replace_changed"):
        set_aside(run_dir)
        return Claim("new", finished=False)
    why = "; its method's stages are shares of method.iterations, so it cannot be extended" \
        if _is_extension(diff) else ""
    raise RunFolderError(f"{run_dir} holds a run of another config ({_describe(diff)}){why}: give another "
                         "hydra.run.dir, or delete that folder to replace its run")


def set_aside(run_dir: Path) -> Path:
    """Move a superseded run's files to ``<parent>/.replaced/<name>-<time>/`` (never deleted)."""
    target = run_dir.parent / ".replaced" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('~')[0]}~{suffix}")
    target.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.suffix in OPEN_FILE_SUFFIXES:
            shutil.copy2(entry, target / entry.name)  # Hydra keeps appending to the open log
        else:
            shutil.move(str(entry), str(target / entry.name))
    return target


def begin_extension(run_dir: Path, recorded_iterations: int) -> None:
    """An extended run is unfinished again: its shorter run's numbers are kept aside, so a
    ``metrics.json`` always belongs to the ``config.yaml`` beside it."""
    done = run_dir / "metrics.json"
    if done.exists():
        done.replace(run_dir / f"metrics.iterations-{recorded_iterations}.json")
