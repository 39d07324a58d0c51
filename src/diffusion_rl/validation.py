"""Checks that run before anything is computed or written: one clear line, exit code 2.

Range checks (``RULES``), unknown group options, and incompatible pairs of components
(``check_compatibility``: a method's capability flags against the dataset's sample kind, the
reward's differentiability and the sampler's stochasticity). The flags live on the Python
classes; importing those would pull in torch and Lightning (~9 s), so they are read here from
the classes' source with ``ast`` (``class_flags``) — the tests check that this reading equals
the imported classes' attributes.
"""

from __future__ import annotations

import ast
import functools
import operator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

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


# ------------------------------------------------------------------ capability flags

PACKAGE = __name__.split(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parent
METHOD_FLAGS = ("fine_tunes", "needs_differentiable_reward", "needs_stochastic_sampler", "sample_kinds")
_COMPARE = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_CASTS = {"float": float, "int": int, "bool": bool}


@functools.lru_cache(maxsize=None)
def _module_source(module: str) -> tuple[ast.Module, bool] | None:
    """The parsed source of a module of this package (and whether it is a package's
    ``__init__``), or ``None`` for a module elsewhere."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    path = PACKAGE_DIR.joinpath(*parts[1:])
    for file, is_init in ((path.with_suffix(".py"), False), (path / "__init__.py", True)):
        if file.is_file():
            return ast.parse(file.read_text(), str(file)), is_init
    return None


def _definition(module: str, name: str) -> tuple[str, ast.ClassDef | ast.FunctionDef] | None:
    """Where ``name`` as seen from ``module`` is defined: in it, or imported into it."""
    source = _module_source(module)
    if source is None:
        return None
    tree, is_init = source
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return module, node
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    parts = module.split(".")
                    base = parts[:len(parts) - node.level + is_init] if node.level else []
                    return _definition(".".join([*base, *(node.module or "").split(".")]).strip("."), alias.name)
    return None


def _class_of(target: str) -> tuple[str, ast.ClassDef] | None:
    """The class a ``_target_`` builds: the class itself, or a factory's annotated return type."""
    module, _, name = target.rpartition(".")
    found = _definition(module, name)
    if found is not None and isinstance(found[1], ast.FunctionDef):
        returns = found[1].returns
        name = returns.id if isinstance(returns, ast.Name) else getattr(returns, "value", None)
        found = _definition(found[0], name) if isinstance(name, str) else None
    return found if found is not None and isinstance(found[1], ast.ClassDef) else None


def _lineage(module: str, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
    """The class and its bases inside the package, nearest first (single inheritance here)."""
    chain = [(module, cls)]
    for base in cls.bases:
        found = _definition(module, base.id) if isinstance(base, ast.Name) else None
        if found is not None and isinstance(found[1], ast.ClassDef):
            chain += _lineage(*found)
    return chain


def _evaluate(node: ast.expr, values: dict) -> Any:
    """An ``__init__`` expression over the constructor's arguments (``self.x`` reads the
    argument ``x``): constants, comparisons, ``and`` / ``or`` / ``not``, float / int / bool."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return values[node.attr]
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        return _COMPARE[type(node.ops[0])](_evaluate(node.left, values), _evaluate(node.comparators[0], values))
    if isinstance(node, ast.BoolOp):
        results = [_evaluate(v, values) for v in node.values]
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CASTS and len(node.args) == 1:
        return _CASTS[node.func.id](_evaluate(node.args[0], values))
    raise ValueError(f"cannot evaluate {ast.unparse(node)!r} statically")


def _init_values(init: ast.FunctionDef, spec: dict) -> dict:
    """Constructor arguments: the config's values over the signature's literal defaults."""
    args = init.args
    values = {}
    for arg, default in zip(args.args[len(args.args) - len(args.defaults):], args.defaults):
        values[arg.arg] = ast.literal_eval(default)
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        if default is not None:
            values[arg.arg] = ast.literal_eval(default)
    return {**values, **spec}


def class_flags(spec: DictConfig, names: tuple[str, ...]) -> dict[str, Any]:
    """The flags ``names`` of the object ``spec`` (a config with ``_target_``) builds, read from
    the source: an assignment ``self.<flag> = <expression>`` in an ``__init__`` (evaluated on
    the config's values; DDIM's ``stochastic``) or else a literal class attribute, following
    base classes inside the package. Flags that are not found (a target outside the package)
    are left out, and the checks that need them are skipped."""
    found = _class_of(str(spec.get("_target_", "")))
    if found is None:
        return {}
    lineage = _lineage(*found)
    flags = {}
    for name in names:
        for _, cls in lineage:  # the instance attribute set by a constructor wins ...
            init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            assigned = [stmt.value for stmt in ast.walk(init) if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" and t.attr == name
                for t in stmt.targets)] if init is not None else []
            if assigned:
                flags[name] = _evaluate(assigned[-1], _init_values(init, OmegaConf.to_container(spec, resolve=True)))
                break
        else:
            for _, cls in lineage:  # ... over the nearest class attribute
                literal = [stmt.value for stmt in cls.body if _stmt_target(stmt) == name]
                if literal:
                    flags[name] = ast.literal_eval(literal[-1])
                    break
    return flags


def _stmt_target(stmt: ast.stmt) -> str | None:
    """The name a class-body statement ``name = value`` / ``name: T = value`` assigns."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
        return stmt.target.id
    return None


def check(cfg: DictConfig, choices=None) -> None:
    """Every check of a composed config: value ranges, then compatible components."""
    validate(cfg)
    check_compatibility(cfg, choices)


def check_compatibility(cfg: DictConfig, choices=None) -> None:
    """Raise :class:`ConfigError` for a method that cannot run with the chosen dataset, reward
    or sampler (its capability flags). ``choices`` (Hydra's ``runtime.choices``) names the
    options in the message; without it the classes are named."""
    def name(group: str) -> str:
        if choices is not None and choices.get(group) is not None:
            return f"{group}={choices[group]}"
        return f"{group} {str(cfg[group].get('_target_', '?')).rsplit('.', 1)[-1]}"

    method = class_flags(cfg.method, METHOD_FLAGS)
    kind = class_flags(cfg.dataset, ("sample_kind",)).get("sample_kind")
    kinds = method.get("sample_kinds")
    if kind is not None and kinds is not None and kind not in kinds:
        raise ConfigError(f"{name('method')} works on {' / '.join(kinds)} only, but {name('dataset')} has {kind}")
    if method.get("needs_differentiable_reward") and class_flags(cfg.reward, ("differentiable",)).get("differentiable") is False:
        raise ConfigError(f"{name('method')} backpropagates through the reward, but {name('reward')} is not differentiable")
    if method.get("needs_stochastic_sampler") and class_flags(cfg.sampler, ("stochastic",)).get("stochastic") is False:
        raise ConfigError(f"{name('method')} needs the log-probabilities of a stochastic sampler, but {name('sampler')} "
                          "is deterministic with these settings")
