"""Checks that run before anything is computed or written: one clear line, exit code 2.

Value types and ranges (``INTEGER_KEYS``, ``RULES``), keys that nothing reads (``check_keys``:
a component's keys against its constructor's parameters), unknown group options, folders a
run cannot write or read (``check_paths``), and incompatible pairs of components
(``check_compatibility``: a method's capability flags against the dataset's sample kind, the
reward's differentiability and the sampler's stochasticity). Parameters and flags live on the
Python classes; importing those would pull in torch and Lightning (~9 s), so they are read
here from the classes' source with ``ast`` (``target_parameters``, ``class_flags``) — the tests
check that this reading equals the imported classes.
"""

from __future__ import annotations

import ast
import difflib
import functools
import math
import operator
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from .local_weights import check_weights_dir

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
    # numpy / Lightning seeds are unsigned 32-bit
    "seed": (lambda v: 0 <= v < 2**32, ">= 0 and < 2**32"),
}

#: Keys that count something: an int, never a float — 2.5 steps would be truncated to 2 by a
#: constructor's ``int()``, and 16.0 fails deep inside Lightning, after the pretraining.
#: Applied, like RULES, to every key of that name anywhere in the config (``null`` passes:
#: optional counts such as ``steps_per_backward``; a constructor that needs the number refuses
#: it through its annotation, ``check_keys``). Keys named in RULES or here must be numbers.
INTEGER_KEYS = frozenset({
    # budgets
    "iterations", "batch_size", "iterations_per_epoch", "epochs", "minibatches", "steps_per_backward",
    "num_batches", "data_batch_size", "chunk_size", "data_samples", "label_pool", "pretrained_samples",
    "saved_images", "max_samples",
    # chains and windows
    "num_steps", "initial_steps", "num_train_timesteps", "steps_offset", "k", "knn_k",
    # shapes (a list of widths, ELEGANT's value_hidden, is not a scalar and not checked here)
    "dim", "length", "vocab_size", "hidden", "value_hidden", "time_dim", "d_model", "nhead", "num_layers",
    "dim_feedforward", "out_dim",
    # Lightning Trainer counts
    "accumulate_grad_batches", "log_every_n_steps", "num_sanity_val_steps",
    # seeds and threads
    "seed", "num_threads",
})

#: Config nodes without a ``_target_`` that the code builds a known class from (their keys are
#: that class's fields): dotted path -> class.
BUILT_FROM = {
    "eval.metrics": "diffusion_rl.evaluation.evaluate.EvalConfig",
    "method.grad_window": "diffusion_rl.core.samplers.GradWindow",
}

#: Hydra's instantiation keys, allowed in any component config
_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_problem(value, integer: bool) -> str | None:
    """What is wrong with ``value`` for a numeric key (``None``: nothing)."""
    if not _is_number(value):
        return "an integer" if integer else "a number"
    if integer and not isinstance(value, int):
        return "an integer"  # 16.0 too: a count written as a float is a slip, not a value
    if not math.isfinite(value):
        return "a finite number"
    return None


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first key whose value has the wrong type or is out
    of range. The run's own ``seed`` must be set (a component's ``seed: null`` means the run's)."""
    if "seed" in cfg and cfg.seed is None:
        raise ConfigError("seed must be an integer >= 0 (got null)")
    for path, key, value in _walk(cfg):
        rule = RULES.get(key)
        if (rule is None and key not in INTEGER_KEYS) or value is None:
            continue
        problem = _type_problem(value, key in INTEGER_KEYS)
        if problem is not None:
            raise ConfigError(f"{path} must be {problem} (got {value!r})")
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{path} must be {rule[1]} (got {value})")


# ------------------------------------------------------------------ group options


def group_options(group_dir: Path) -> list[str]:
    """The options of a config group: its YAML files (shared bases live outside group folders)."""
    return sorted(p.stem for p in group_dir.glob("*.yaml"))


def _override_values(override, options: list[str]) -> list:
    """Every option a group override selects: one, a list, or each value of a sweep (``a,b``,
    ``choice(a,b)``, ``range(...)``, ``glob(pattern)`` over the group's options)."""
    from hydra.core.override_parser.types import Glob

    value = override.value()
    if isinstance(value, Glob):
        matched = value.filter(options)
        if not matched:
            raise ConfigError(f"{override.input_line}: the pattern matches no option of '{override.key_or_group}' "
                              f"(choose from: {', '.join(options)})")
        return matched
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    if override.is_sweep_override():
        return []  # an interval: no option names (Hydra's sweeper rejects it for a group)
    return list(value) if isinstance(value, list) else [value]


def check_group_overrides(args: list[str], config_dir: Path) -> None:
    """Unknown or empty ``group=option`` overrides, every value of a sweep included, caught
    before Hydra prints its multi-line report. Overrides are read with Hydra's own parser;
    arguments starting with ``-`` (flags such as ``--multirun``) are skipped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            raise ConfigError(f"cannot read the override {arg!r}: {first_line(err)}") from None
        group = override.key_or_group
        if override.is_hydra_override() or override.is_delete() or not (config_dir / group).is_dir():
            continue
        options = group_options(config_dir / group)
        for option in _override_values(override, options):
            if option is None:  # group=null: no option
                continue
            if option == "":
                raise ConfigError(f"'{group}=' names no option (choose from: {', '.join(options)})")
            if str(option) not in options:
                raise ConfigError(f"unknown option '{option}' for '{group}' (choose from: {', '.join(options)})")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (Hydra's and OmegaConf's run over several)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


# ------------------------------------------------------------------ keys nothing reads


def _is_dataclass(cls: ast.ClassDef) -> bool:
    def name(node):
        node = node.func if isinstance(node, ast.Call) else node
        return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return any(name(d) == "dataclass" for d in cls.decorator_list)


def _signature(fn: ast.FunctionDef) -> dict[str, ast.expr | None]:
    """Parameter name -> annotation of a ``def`` (``self`` and ``*args`` left out)."""
    args = fn.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    return {a.arg: a.annotation for a in params if a.arg not in ("self", "cls")}


def _forwards_kwargs(init: ast.FunctionDef) -> bool:
    """Whether ``**kw`` reaches ``super().__init__`` unchanged: passed on as ``**kw`` and never
    rebound (``kw = {...}`` filters it: Pretrained drops the keys an experiment sets for the
    other methods, so what it accepts cannot be read from the source)."""
    kwarg = init.args.kwarg.arg
    for node in ast.walk(init):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == kwarg for t in targets):
            return False
    for node in ast.walk(init):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                and any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kwarg for k in node.keywords)):
            return True
    return False


@functools.lru_cache(maxsize=None)
def target_parameters(target: str) -> dict[str, ast.expr | None] | None:
    """The keys a config with this ``_target_`` may set — the parameters of the function, of the
    class's ``__init__`` (through ``**kwargs`` passed on to base classes inside the package) or a
    dataclass's fields — each with its annotation. ``None`` where that set is open or unknown: a
    target outside the package, ``**kwargs`` that leave it or are filtered."""
    module, _, name = target.rpartition(".")
    found = _definition(module, name)
    if found is None:
        return None
    if isinstance(found[1], ast.FunctionDef):
        return None if found[1].args.kwarg is not None else _signature(found[1])
    lineage = _lineage(*found)
    params: dict[str, ast.expr | None] = {}
    for _, cls in lineage:
        if _is_dataclass(cls):
            fields = {s.target.id: s.annotation for s in cls.body
                      if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                      and "ClassVar" not in ast.unparse(s.annotation)}
            params = {**fields, **params}  # a subclass's field wins
            continue
        init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            continue  # an inherited constructor: the next base's
        params = {**_signature(init), **params}
        if init.args.kwarg is None:
            return params
        if not _forwards_kwargs(init):
            return None
    # the chain left the package (no constructor of its own, or **kwargs passed to a base such
    # as nn.Module) unless it is made of dataclasses only
    return params if all(_is_dataclass(cls) for _, cls in lineage) else None


def _annotation_kinds(annotation: ast.expr | None) -> set[str] | None:
    """``float`` / ``int`` / ``bool`` / ``str``, or a union of those with ``None``, as a set of
    names; ``None`` for any other annotation (left unchecked)."""
    if annotation is None:
        return None
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        left, right = _annotation_kinds(annotation.left), _annotation_kinds(annotation.right)
        return None if left is None or right is None else left | right
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "Optional":
        inner = _annotation_kinds(annotation.slice)
        return None if inner is None else inner | {"None"}
    if isinstance(annotation, ast.Constant) and annotation.value is None:
        return {"None"}
    if isinstance(annotation, ast.Name) and annotation.id in ("float", "int", "bool", "str"):
        return {annotation.id}
    return None


def _annotation_problem(value, kinds: set[str]) -> str | None:
    """What is wrong with ``value`` for a parameter annotated ``kinds`` (``None``: nothing). An
    ``int`` annotation is only "a number" here: which keys are integers is INTEGER_KEYS' say."""
    if value is None and "None" in kinds:
        return None
    if kinds & {"float", "int"} and _is_number(value):
        return None if math.isfinite(value) else "a finite number"
    if ("bool" in kinds and isinstance(value, bool)) or ("str" in kinds and isinstance(value, str)):
        return None
    phrases = {"float": "a number", "int": "a number", "bool": "true or false", "str": "a string"}
    return " or ".join(sorted({phrases[k] for k in kinds - {"None"}}))


def _components(node, prefix: str = "") -> Iterable[tuple[str, DictConfig, str]]:
    """``(dotted path, node, target)`` of every config node that builds an object: a ``_target_``,
    or a node in :data:`BUILT_FROM`."""
    if isinstance(node, DictConfig):
        path = prefix.rstrip(".")
        target = node.get("_target_") if "_target_" in node else BUILT_FROM.get(path)
        if isinstance(target, str):
            yield path, node, target
        for key in node.keys():
            if key != "hydra":
                yield from _components(node[key], f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _components(item, f"{prefix}{i}.")


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to a mistyped ``word`` (``None`` when none is close)."""
    match = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return match[0] if match else None


def check_keys(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a key of a component that its constructor does not take
    (``+method.kl_wieght=1`` would otherwise fail when the method is built, after the
    pretraining) — naming the closest parameter — or whose value its annotation rules out."""
    for path, node, target in _components(cfg):
        params = target_parameters(target)
        if params is None:
            continue
        where = f"{path}." if path else ""
        for key in node.keys():
            if key in _HYDRA_KEYS:
                continue
            if key not in params:
                near = closest(str(key), params)
                hint = f" (did you mean {where}{near}?)" if near else f" (it takes: {', '.join(sorted(params))})"
                raise ConfigError(f"{where}{key} is not a parameter of {target.rsplit('.', 1)[-1]}{hint}")
            kinds, value = _annotation_kinds(params[key]), node[key]
            if kinds is not None and not isinstance(value, (DictConfig, ListConfig)):
                problem = _annotation_problem(value, kinds)
                if problem is not None:
                    raise ConfigError(f"{where}{key} must be {problem} (got {value!r})")


def unknown_key_message(full_key: str, cfg: DictConfig | None) -> str:
    """One line for an override of a key that does not exist (``method.kl_wieght=1``), naming
    the closest key of its node in ``cfg`` (the config composed without that override) or of
    the parameters its ``_target_`` takes."""
    parent, _, key = full_key.rpartition(".")
    node = (OmegaConf.select(cfg, parent) if parent else cfg) if cfg is not None else None
    if not isinstance(node, DictConfig):
        return f"{full_key} is not a key of the config"
    keys = [str(k) for k in node.keys() if not str(k).startswith("_")]
    params = target_parameters(str(node.get("_target_"))) if "_target_" in node else None
    near = closest(key, [*keys, *(params or ())])
    where, prefix = (parent, f"{parent}.") if parent else ("the config", "")
    if near is None:
        return f"{full_key} is not a key of {where} (its keys: {', '.join(keys)})"
    # a parameter the YAML does not set is added with +
    plus = "" if near in keys else "+"
    return f"{full_key} is not a key of {where} (did you mean {plus}{prefix}{near}?)"


def check_top_level_key(key: str, cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` when a top-level ``key`` added on the command line
    (``+kl_weight=5``) is not one that ``cfg`` — the config composed without that override — has:
    no code reads a new top-level key, so the value would be silently ignored."""
    if key in cfg:
        return
    same_name = [path for path, leaf, _ in _walk(cfg) if leaf == key]
    near = same_name[0] if same_name else closest(key, [str(k) for k in cfg.keys() if k != "hydra"])
    hint = f" (did you mean {near}?)" if near else ""
    raise ConfigError(f"{key} is not a key of the config: no code reads a new top-level key{hint}")


# ------------------------------------------------------------------ folders


def _probe_writable(path: Path) -> str | None:
    """Why a run could not create files under ``path`` (``None``: it can). The nearest existing
    folder above it is tried by creating and removing an empty folder there: permissions alone
    do not tell (root passes every permission check, yet cannot write under /proc)."""
    path = path.absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".diffusion_rl-write-check-", dir=existing))
    except OSError as err:
        return f"cannot create anything in {existing} ({err.strerror or err})"
    return None


def _raw(cfg: DictConfig, path: str):
    """The value at ``path`` as written (interpolations unresolved)."""
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return OmegaConf.to_container(node, resolve=False)[key]


def _named_after(cfg: DictConfig, path: str, root_key: str) -> str:
    """``root_key`` when ``path``'s value is written in terms of it (``${paths.data_dir}/gfp``), so
    that the message names the key a user sets; else ``path`` itself."""
    return root_key if f"${{{root_key}}}" in str(_raw(cfg, path)) else path


def check_output_dir(key: str, path) -> None:
    """Raise :class:`ConfigError` naming ``key`` when the folder ``path`` (a run's, a sweep's)
    cannot be created: a file where a folder is needed, a place nobody can write."""
    problem = _probe_writable(Path(str(path)))
    if problem:
        raise ConfigError(f"{key}: the folder {path} cannot be created: {problem}")


def check_paths(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a folder the run would fail on after seconds or hours of
    work: a cache it cannot write (``paths.cache_dir``, any ``cache_dir``) or a data folder
    (``data_dir``) that does not exist, or local weights (``weights_dir``) not given, naming
    ``paths.*`` when the value comes from it."""
    missing_weights = []
    for path, key, value in _walk(cfg):
        if key == "cache_dir" and value is not None:
            problem = _probe_writable(Path(str(value)))
            if problem:
                raise ConfigError(f"{_named_after(cfg, path, 'paths.cache_dir')}: the cache {value} cannot be "
                                  f"written: {problem}")
        elif key == "data_dir" and path != "paths.data_dir" and value is not None and not Path(value).is_dir():
            named = _named_after(cfg, path, "paths.data_dir")
            if named == "paths.data_dir" and not Path(cfg.paths.data_dir).is_dir():
                raise ConfigError(f"paths.data_dir: no folder {Path(cfg.paths.data_dir).absolute()} (the shared "
                                  f"data, which {path} reads; set paths.data_dir or DIFFUSION_RL_DATA_DIR)")
            raise ConfigError(f"{named}: no folder {Path(value).absolute()} (the data {path} reads)")
        elif key == "weights_dir":  # pretrained weights from a local folder (local_weights.py)
            named = re.search(r"\$\{(paths\.[\w.]+)\}", str(_raw(cfg, path)))
            component = path.rsplit(".", 1)[0]
            target = str(OmegaConf.select(cfg, f"{component}._target_") or "?").rsplit(".", 1)[-1]
            try:
                check_weights_dir(value, named.group(1) if named else path, f"the weights {component} ({target}) loads")
            except FileNotFoundError as err:
                missing_weights.append(str(err))
    if missing_weights:  # every folder still to give, in one line: the backbone's first
        raise ConfigError("; ".join(sorted(missing_weights, key=lambda m: "backbone" not in m)))


# ------------------------------------------------------------------ all of them


def check(cfg: DictConfig, choices=None) -> None:
    """Every check of a composed config but the folders': value types and ranges, keys that
    nothing reads, then compatible components. An interpolation that does not resolve is one
    of them too."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        validate(cfg)
        check_keys(cfg)
        check_compatibility(cfg, choices)
    except OmegaConfBaseException as err:  # e.g. ${dataset.dimm}
        raise ConfigError(f"{getattr(err, 'full_key', None) or 'config'}: {first_line(err)}") from None


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
                          "is deterministic with these settings (pick a stochastic one: sampler=euler_maruyama, or "
                          "sampler=ddim sampler.eta=1.0)")
