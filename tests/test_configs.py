"""Every config composes: each experiment (alone and with debug=smoke), each option of each
group; experiment tables only reference groups they define; composed configs pass validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_rl.validation import ConfigError, check_group_overrides, validate

from conftest import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("experiment", "debug"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


METHODS = options("method")


#: options that only make sense together: sequence backbones and oracles read the dataset's
#: length and alphabet, so they compose with a sequence dataset
SEQUENCE = ["dataset=tfbind8", "reward=tfbind8_oracle", "process=vp", "backbone=sequence_transformer"]
COMPANIONS = {
    ("dataset", "tfbind8"): SEQUENCE,
    ("dataset", "gfp"): ["dataset=gfp", "reward=gfp_oracle", "process=vp", "backbone=sequence_transformer"],
    ("reward", "tfbind8_oracle"): SEQUENCE,
    ("reward", "gfp_oracle"): ["dataset=gfp", "backbone=sequence_transformer"],
    ("backbone", "sequence_transformer"): SEQUENCE,
}


def with_companions(group: str, option: str) -> list[str]:
    extra = [o for o in COMPANIONS.get((group, option), []) if not o.startswith(f"{group}=")]
    return [f"{group}={option}", *extra]


def compose_config(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=overrides)


def test_the_config_groups_exist():
    assert {"method", "sampler", "process", "dataset", "reward", "pretrain", "backbone", "eval"} <= set(GROUPS)
    assert {"dpok", "ddpo", "qlearning", "pretrained"} <= set(METHODS)


def test_default_config_composes_and_validates():
    cfg = compose_config([])
    validate(cfg)
    assert cfg.method._target_.endswith("DPOK")
    assert cfg.seed == 0 and cfg.paths.cache_dir


@pytest.mark.parametrize("debug", [[], ["debug=smoke"]], ids=["plain", "smoke"])
@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, debug):
    cfg = compose_config([*with_companions(group, option), *debug])
    assert OmegaConf.select(cfg, group) is not None
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_with_target_and_shared_settings(method):
    cfg = compose_config([f"method={method}"])
    assert cfg.method._target_.startswith("diffusion_rl.methods.")
    for key in ("iterations", "batch_size", "lr", "iterations_per_epoch", "grad_window", "checkpoint_steps"):
        assert key in cfg.method, (method, key)
    smoke = compose_config([f"method={method}", "debug=smoke"])
    # debug=smoke shrinks the run (pretrained keeps its 0 iterations)
    assert smoke.method.iterations <= 3 and smoke.method.batch_size <= 16
    assert smoke.sampler.num_steps <= 4 and smoke.pretrain.iterations <= 20
    assert smoke.eval.metrics.num_batches * smoke.eval.metrics.batch_size <= 64
    assert "wandb" not in (smoke.logger or {})


def test_pretrained_method_trains_zero_iterations():
    assert compose_config(["method=pretrained"]).method.iterations == 0


@pytest.mark.parametrize("group", ["process", "sampler", "dataset", "reward", "backbone"])
def test_cheap_components_instantiate(group):
    """The constructors the runner calls before writing anything accept every shipped option."""
    for option in options(group):
        cfg = compose_config(with_companions(group, option))
        if group == "sampler":
            obj = instantiate(cfg.sampler, process=instantiate(cfg.process))
            assert obj.num_steps == cfg.sampler.num_steps
        else:
            assert instantiate(cfg[group]) is not None


# ------------------------------------------------------------------ experiments


def test_experiment_options_are_known_to_the_group_check():
    for name in EXPERIMENTS:
        check_group_overrides([f"experiment={name}"], CONF_DIR)
    with pytest.raises(ConfigError, match="experiment"):
        check_group_overrides(["experiment=surely_not_an_experiment"], CONF_DIR)


@pytest.mark.parametrize("debug", [[], ["debug=smoke"]], ids=["plain", "smoke"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name, debug):
    cfg = compose_config([f"experiment={name}", *debug])
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_table_rows_reference_defined_groups(name):
    cfg = compose_config([f"experiment={name}"])
    if "table" not in cfg:
        pytest.skip(f"{name} has no table")
    table = cfg.table
    assert table.name == name, "the report runs `experiment=<table.name>`: it must be the file's name"
    # a derived table drops an inherited group by setting it to null
    groups = {g for g, spec in table.groups.items() if spec is not None}
    assert groups, name
    for row in table.get("rows") or []:
        assert row.group in groups, (name, row.label, row.group)
    if table.get("figure") is not None:
        assert table.figure.group in groups, (name, table.figure.group)
    for group in sorted(groups):
        spec = table.groups[group]
        # each group's overrides (and the first value of each swept key) compose on top
        sweep = [f"{k}={vals[0]}" for k, vals in (spec.get("sweep") or {}).items()]
        overrides = [*list(spec.get("overrides") or []), *sweep]
        check_group_overrides(overrides, CONF_DIR)
        validate(compose_config([f"experiment={name}", *overrides]))


# ------------------------------------------------------------------ group check


def test_group_check_rejects_unknown_options_and_lists_choices():
    with pytest.raises(ConfigError) as err:
        check_group_overrides(["method=nope"], CONF_DIR)
    assert "nope" in str(err.value) and "method" in str(err.value)
    for m in METHODS:
        assert m in str(err.value)
    with pytest.raises(ConfigError):
        check_group_overrides(["sampler=ddim,bogus"], CONF_DIR)  # sweeps are checked item by item
    check_group_overrides(["sampler=ddim,ode_euler", "method.lr=0.1", "hydra.run.dir=x", "--multirun"], CONF_DIR)


def test_group_check_rejects_private_base_configs():
    with pytest.raises(ConfigError):
        check_group_overrides(["method=_finetune"], CONF_DIR)


@pytest.mark.parametrize("override, key", [
    ("process.T=0", "process.T"), ("sampler.num_steps=-1", "sampler.num_steps"),
    ("method.lr=0", "method.lr"), ("method.kl_weight=-0.5", "method.kl_weight"),
    ("eval.metrics.num_batches=0", "eval.metrics.num_batches"),
])
def test_validate_names_the_offending_key(override, key):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)
