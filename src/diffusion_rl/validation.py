"""Checks that run before anything is computed or written: one clear line, exit code 2."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

#: key name -> (predicate, phrase). Applied to every key of that name anywhere in the config.
RULES = {
    "T": (lambda v: v > 0, "> 0"),
    "num_steps": (lambda v: v > 0, "> 0"),
    "iterations": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v > 0, "> 0"),
    "num_batches": (lambda v: v > 0, "> 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "value_lr": (lambda v: v > 0, "> 0"),
    "temperature": (lambda v: v > 0, "> 0"),
    "delta": (lambda v: v > 0, "> 0"),
    "reward_weight": (lambda v: v >= 0, ">= 0"),
    "kl_weight": (lambda v: v >= 0, ">= 0"),
    "alpha": (lambda v: v >= 0, ">= 0"),
    "eta": (lambda v: v >= 0, ">= 0"),
    "scale": (lambda v: v > 0, "> 0"),
    "clip_range": (lambda v: v > 0, "> 0"),
    "iterations_per_epoch": (lambda v: v > 0, "> 0"),
    "minibatches": (lambda v: v >= 1, ">= 1"),
    "data_samples": (lambda v: v >= 1, ">= 1"),
    "data_batch_size": (lambda v: v > 1, "> 1"),
}


class ConfigError(ValueError):
    pass


def _walk(node, prefix=""):
    if isinstance(node, DictConfig):
        for key in node.keys():
            if key == "hydra":
                continue
            value = node[key]
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", key, value
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _walk(item, f"{prefix}{i}.")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first key whose value is out of range."""
    for path, key, value in _walk(cfg):
        rule = RULES.get(key)
        if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok, phrase = rule
        if not ok(value):
            raise ConfigError(f"{path} must be {phrase} (got {value})")


def check_group_overrides(args: list[str], config_dir: Path) -> None:
    """Unknown ``group=option`` overrides, caught before Hydra prints its multi-line report."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = config_dir / key
        if key.startswith("hydra") or not group.is_dir():
            continue
        for option in value.split(","):
            # files starting with "_" are shared bases (method/_finetune.yaml), not options
            if option and option != "null" and (option.startswith("_") or not (group / f"{option}.yaml").exists()):
                choices = sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_"))
                raise ConfigError(f"unknown option '{option}' for '{key}' (choose from: {', '.join(choices)})")
