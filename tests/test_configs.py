"""Every config composes: each experiment (alone and with debug=smoke), each option of each
group; experiment tables only reference groups they define; composed configs pass validation."""

from __future__ import annotations

import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, get_method, instantiate
from omegaconf import OmegaConf

from diffusion_rl.validation import METHOD_FLAGS, ConfigError, check_compatibility, check_group_overrides, class_flags, validate

from conftest import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("experiment", "debug"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


METHODS = options("method")


#: options that read a sequence dataset's length and alphabet: they compose with one (whose
#: preset brings the rest)
COMPANIONS = {
    ("reward", "tfbind8_oracle"): "dataset=tfbind8",
    ("reward", "gfp_oracle"): "dataset=gfp",
    ("true_reward", "tfbind8_exact"): "dataset=tfbind8",
    ("true_reward", "gfp_proxy_oracle"): "dataset=gfp",
    ("backbone", "sequence_transformer"): "dataset=tfbind8",
    # the exact score of the data mixture: reads dataset.weights / means / stds
    ("backbone", "mixture_score"): "dataset=gmm2d",
    ("backbone", "unet2d"): "dataset=digits",
    ("reward", "digits_classifier"): "dataset=digits",
    ("true_reward", "digits_classifier"): "dataset=digits",
    ("backbone", "stable_diffusion"): "dataset=sd_animals",
}
#: components whose constructors load weights from a local folder (paths.*): instantiated on
#: tiny in-memory weights in tests/test_stable_diffusion.py, not from the bare config
LOCAL_WEIGHTS = {("backbone", "stable_diffusion"), ("reward", "laion_aesthetic")}

#: dataset -> what its preset selects
PRESETS = {
    "swiss_roll": {"reward": "swiss_roll_box", "true_reward": None, "process": "ou", "backbone": "mlp"},
    "gmm1d": {"reward": "near_six", "true_reward": None, "process": "ou", "backbone": "mlp"},
    "tfbind8": {"reward": "tfbind8_oracle", "true_reward": "tfbind8_exact", "process": "vp",
                "backbone": "sequence_transformer"},
    "gfp": {"reward": "gfp_oracle", "true_reward": "gfp_proxy_oracle", "process": "vp", "backbone": "sequence_transformer"},
    "gaussian1d": {"reward": "quadratic_two", "true_reward": None, "process": "ou", "backbone": "affine_step",
                   "pretrain": None},
    "gmm2d": {"reward": "quadratic_2d", "true_reward": None, "process": "vp", "backbone": "mixture_score",
              "pretrain": None},
    "digits": {"reward": "digits_classifier", "true_reward": "digits_classifier", "process": "vp_eps",
               "backbone": "unet2d", "pretrain": "digits_score_matching"},
    "sd_animals": {"reward": "laion_aesthetic", "true_reward": None, "process": "discrete_vp",
                   "backbone": "stable_diffusion", "pretrain": None},
}


def with_companions(group: str, option: str) -> list[str]:
    extra = COMPANIONS.get((group, option))
    return [f"{group}={option}", *([extra] if extra else [])]


def choices(overrides: list[str]) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return dict(compose("config", overrides=overrides, return_hydra_config=True).hydra.runtime.choices)


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
        if (group, option) in LOCAL_WEIGHTS:
            continue
        cfg = compose_config(with_companions(group, option))
        if group == "sampler":
            obj = instantiate(cfg.sampler, process=instantiate(cfg.process))
            assert obj.num_steps == cfg.sampler.num_steps
        else:
            assert instantiate(cfg[group]) is not None


# ------------------------------------------------------------------ presets


def test_every_dataset_has_a_preset():
    assert set(PRESETS) == set(options("dataset"))


@pytest.mark.parametrize("extra", [[], ["debug=smoke"], ["method=guidance", "debug=smoke"]], ids=["plain", "smoke", "guidance"])
@pytest.mark.parametrize("dataset", list(PRESETS))
def test_a_dataset_brings_its_companions(dataset, extra):
    chosen = choices([f"dataset={dataset}", *extra])
    assert {g: chosen[g] for g in PRESETS[dataset]} == PRESETS[dataset]
    cfg = compose_config([f"dataset={dataset}", *extra])
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)
    # the MLP's width and the transformer's shape follow the dataset
    if chosen["backbone"] == "mlp":
        assert cfg.backbone.dim == cfg.dataset.dim
    elif chosen["backbone"] == "affine_step":  # one affine score per step of the sampler's grid
        assert cfg.backbone.num_steps == cfg.sampler.num_steps and cfg.dataset.dim == 1
    elif chosen["backbone"] == "unet2d":  # the image's side and channels
        assert (cfg.backbone.sample_size, cfg.backbone.in_channels) == (cfg.dataset.image_size, cfg.dataset.channels)
    elif chosen["backbone"] == "mixture_score":  # the exact score of the dataset's own mixture
        assert (cfg.backbone.weights, cfg.backbone.means) == (cfg.dataset.weights, cfg.dataset.means)
    elif chosen["backbone"] == "stable_diffusion":  # the prompts the backbone encodes
        assert (cfg.backbone.train_prompts, cfg.backbone.eval_prompts) == (cfg.dataset.train_prompts, cfg.dataset.eval_prompts)
    else:
        assert (cfg.backbone.length, cfg.backbone.vocab_size) == (cfg.dataset.length, cfg.dataset.vocab_size)


def test_the_command_line_wins_over_the_preset():
    chosen = choices(["dataset=tfbind8", "reward=swiss_roll_box", "process=ou"])
    assert (chosen["reward"], chosen["process"], chosen["backbone"]) == ("swiss_roll_box", "ou", "sequence_transformer")
    # Hydra drops a group with `~group` (`group=null` is not accepted on its command line)
    assert "true_reward" not in compose_config(["dataset=tfbind8", "~true_reward"])
    # also over an experiment that selects the dataset, and in either order
    for overrides in (["experiment=elegant_tfbind8", "reward=gfp_oracle"], ["reward=gfp_oracle", "experiment=elegant_tfbind8"]):
        assert choices(overrides)["reward"] == "gfp_oracle"
    # a dataset chosen on the command line replaces an experiment's, with its own companions
    chosen = choices(["experiment=elegant_tfbind8", "dataset=gfp"])
    assert (chosen["dataset"], chosen["reward"], chosen["true_reward"]) == ("gfp", "gfp_oracle", "gfp_proxy_oracle")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_inherits_its_datasets_companions(name):
    chosen = choices([f"experiment={name}"])
    assert {g: chosen[g] for g in PRESETS[chosen["dataset"]]} == PRESETS[chosen["dataset"]]


# ------------------------------------------------------------------ capability flags


@pytest.mark.parametrize("method", METHODS)
def test_statically_read_method_flags_equal_the_class(method):
    """validation reads the flags from the source: it must agree with the imported class."""
    cfg = compose_config([f"method={method}"])
    cls = get_class(cfg.method._target_)
    assert class_flags(cfg.method, METHOD_FLAGS) == {name: getattr(cls, name) for name in METHOD_FLAGS}
    assert set(cls.sample_kinds) <= {"vectors", "tokens", "images"}


def test_statically_read_flags_of_datasets_rewards_and_samplers_equal_the_objects():
    for dataset in options("dataset"):
        cfg = compose_config([f"dataset={dataset}"])
        assert class_flags(cfg.dataset, ("sample_kind",)) == {"sample_kind": get_class(cfg.dataset._target_).sample_kind}
    for group in ("reward", "true_reward"):
        for option in options(group):
            cfg = compose_config(with_companions(group, option))
            target = get_method(cfg[group]._target_)
            # a factory (oracles are fitted by one) declares the class it returns
            cls = target if isinstance(target, type) else typing.get_type_hints(target)["return"]
            assert class_flags(cfg[group], ("differentiable",)) == {"differentiable": cls.differentiable}, option
    for option, extra in [(o, []) for o in options("sampler")] + [("ddim", ["sampler.eta=1.0"]), ("ddim", ["sampler.eta=0"])]:
        cfg = compose_config([f"sampler={option}", *extra])
        sampler = instantiate(cfg.sampler, process=instantiate(cfg.process))
        assert class_flags(cfg.sampler, ("stochastic",)) == {"stochastic": sampler.stochastic}, (option, extra)


#: value-weighted sampling's variants; those whose value is differentiated through the reward
VALUE_WEIGHTED = {m for m in METHODS if m.startswith("value_weighted")}
VALUE_WEIGHTED_GRADIENT = {m for m in VALUE_WEIGHTED if "tweedie" in m}


def test_flags_say_what_the_methods_need():
    flags = {m: class_flags(compose_config([f"method={m}"]).method, METHOD_FLAGS) for m in METHODS}
    inference_time = {"smc", "smc_twisted", "svdd", "svdd_argmax", "svdd_mc"} | VALUE_WEIGHTED
    assert {m for m, f in flags.items() if not f["fine_tunes"]} == \
        {"pretrained", "guidance", "reward_guidance", "exact_optimum", "gaussian_target", "mixture_target"} | inference_time
    assert {m for m, f in flags.items() if f["needs_differentiable_reward"]} == \
        {"reward_backprop", "nokl", "truncation", "random_k", "elegant", "ctrl", "smc_twisted"} | VALUE_WEIGHTED_GRADIENT
    assert {m for m, f in flags.items() if f["needs_stochastic_sampler"]} == \
        {"ddpo", "dpok", "ppo_kl", "ppo_kl_log_ratio", "soft_ppo", "rw_mle", "ctrl", "ctrl_plain_critic", "pcl",
         "pcl_subtrajectory", "pcl_trajectory_balance", "smc", "smc_twisted", "svdd", "svdd_argmax", "svdd_mc",
         "value_weighted_path_integral"}
    assert {m for m, f in flags.items() if "tokens" not in f["sample_kinds"]} == \
        {"qlearning", "qlearning_mc", "gaussian_target", "mixture_target", "value_weighted_path_integral"}
    assert {m for m, f in flags.items() if "vectors" not in f["sample_kinds"]} == {"exact_optimum"}


@pytest.mark.parametrize("overrides, words", [
    (["method=qlearning", "dataset=tfbind8"], ["method=qlearning", "dataset=tfbind8", "tokens"]),
    (["method=qlearning", "dataset=gfp"], ["method=qlearning", "dataset=gfp"]),
    (["method=nokl"], ["method=nokl", "reward=swiss_roll_box", "differentiable"]),
    (["method=elegant", "dataset=tfbind8", "reward=swiss_roll_box"], ["method=elegant", "reward=swiss_roll_box"]),
    (["method=dpok", "sampler=ode_euler"], ["method=dpok", "sampler=ode_euler", "stochastic"]),
    (["method=ddpo", "sampler=ddim", "sampler.eta=0"], ["method=ddpo", "sampler=ddim"]),
    (["method=ppo_kl", "dataset=tfbind8", "sampler=ode_euler"], ["method=ppo_kl", "sampler=ode_euler"]),
])
def test_incompatible_pairs_are_named(overrides, words):
    with pytest.raises(ConfigError) as err:
        check_compatibility(compose_config(overrides), choices(overrides))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("overrides", [
    ["method=qlearning", "sampler=ddim"], ["method=qlearning", "sampler=ode_euler"], ["method=dpok", "sampler=ddim", "sampler.eta=1"],
    ["method=nokl", "dataset=gmm1d"], ["method=elegant", "dataset=tfbind8"], ["method=guidance", "dataset=tfbind8"],
    ["method=dpok"], ["method=pretrained", "dataset=gfp", "sampler=ode_euler"],
])
def test_compatible_pairs_pass(overrides):
    check_compatibility(compose_config(overrides), choices(overrides))


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
    if table.get("figure") is not None:  # one group, or (image grids) a group per panel
        drawn = [p.group for p in table.figure.panels] if "panels" in table.figure else [table.figure.group]
        assert set(drawn) <= groups, (name, drawn)
    for group in sorted(groups):
        spec = table.groups[group]
        # each group's overrides (and the first value of each swept key) compose on top
        sweep = [f"{k}={vals[0]}" for k, vals in (spec.get("sweep") or {}).items()]
        overrides = [*list(spec.get("overrides") or []), *sweep]
        check_group_overrides(overrides, CONF_DIR)
        cfg = compose_config([f"experiment={name}", *overrides])
        validate(cfg)
        check_compatibility(cfg)  # every table group is a pair that runs


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


# ------------------------------------------------------------------ trainer


def test_trainer_yaml_instantiates_a_lightning_trainer_with_its_values(tmp_path):
    import lightning as L

    from diffusion_rl.runner import build_trainer, check_trainer

    cfg = compose_config(["trainer=gpu", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
                          "trainer.accumulate_grad_batches=3", "+trainer.gradient_clip_val=0.5"])
    check_trainer(cfg)
    trainer = build_trainer(cfg, tmp_path, epochs=2, loggers=[], checkpoint=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.precision == "bf16-mixed" and trainer.accumulate_grad_batches == 3
    assert trainer.gradient_clip_val == 0.5 and trainer.max_epochs == 2
    default = build_trainer(compose_config(["debug=smoke"]), tmp_path, epochs=1, loggers=[], checkpoint=True)
    assert default.precision == "32-true" and default.accumulate_grad_batches == 1
    assert default.log_every_n_steps == 1 and default.num_sanity_val_steps == 0  # debug=smoke's value; the YAML's


def test_trainer_options_set_accelerator_devices_and_strategy():
    gpu, ddp = compose_config(["trainer=gpu"]).trainer, compose_config(["trainer=ddp"]).trainer
    assert (gpu.accelerator, gpu.devices, gpu.strategy) == ("gpu", 1, "auto")
    # Lightning's DDP, less its wrapper for manual optimisation (the methods average their gradients)
    assert ddp.accelerator == "gpu" and ddp.devices > 1 and ddp.strategy._target_ == "diffusion_rl.distributed.ManualSyncDDPStrategy"
    assert ddp._target_ == gpu._target_ == "lightning.Trainer"


@pytest.mark.parametrize("override, message", [
    ("+trainer.surely_not_an_argument=1", "trainer.surely_not_an_argument is not an argument of lightning.Trainer"),
    ("+trainer.max_epochs=3", "trainer.max_epochs is set by the runner")])
def test_trainer_check_names_an_unknown_or_runner_owned_key(override, message):
    from diffusion_rl.runner import check_trainer

    with pytest.raises(ValueError, match=message):
        check_trainer(compose_config([override]))


def test_unknown_trainer_key_is_one_error_line_and_writes_nothing(tmp_path):
    from conftest import last_error_line, path_overrides, run_cli

    proc = run_cli(["debug=smoke", "+trainer.surely_not_an_argument=1", f"hydra.run.dir={tmp_path / 'run'}",
                    *path_overrides(tmp_path)])
    assert proc.returncode == 2
    assert last_error_line(proc).startswith("error: trainer.surely_not_an_argument is not an argument")
    # only Hydra's own log (written before the task starts) is there
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["cli.log"]
