"""Stages of one run: (cached) pretraining → fine-tuning → shared evaluation → outputs.

Run outputs contract (read by ``scripts/make_table.py`` and other tools), all in ``run_dir``:
``config.yaml`` (composed config), ``metrics.json`` (flat final numbers), ``metrics.csv``
(curves, Lightning CSV logger), ``samples.npy`` (final evaluation samples; decoded tokens
``[N, L]`` for sequences; images: a bounded number, plus ``samples.png``; evaluation/samples.py),
``rewards.npy`` (their nominal rewards), ``timing.json`` (wall seconds, kept out of
``metrics.json`` so that the same command gives the same bytes), ``last.ckpt``.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from . import run_folder
from .cache import cached
from .dashboard import build_loggers, record_final
from .image_grids import training_image_grids
from .checkpointing import CHECKPOINT_NAME, EpochCheckpoint, check_checkpoint, checkpoint_step
from .evaluation.evaluate import EvalConfig, build_metrics, evaluate, sample_kind
from .evaluation.samples import write_samples
from .logs import ProgressLines, interactive, quiet_libraries
from .seeding import derive_seed, no_global_draws, seeded_draws
from .methods.base import DivergenceError
from .validation import class_flags

log = logging.getLogger(__name__)


#: Trainer arguments the runner sets per stage; conf/trainer/ must leave them out.
RUNNER_TRAINER_KEYS = ("max_epochs", "logger", "callbacks", "enable_checkpointing", "default_root_dir")
# (enable_progress_bar stays a trainer key: the runner shows the bar only on a terminal)
#: Trainer settings that change what a fit computes (not only how it is shown or logged):
#: part of the pretraining cache key, so e.g. a bf16 backbone never stands in for a float32 one.
FIT_TRAINER_KEYS = ("precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")


def check_local_ddp_sweep(cfg: DictConfig) -> None:
    """A multi-process DDP job inside a local ``-m`` sweep as one ``ValueError``: Lightning's
    launcher starts the other ranks by running the same command line again, which here is
    the whole sweep (a cluster launcher starts every rank itself: allowed)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    strategy = cfg.trainer.get("strategy")
    ddp = "DDP" in str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy).startswith("ddp")
    if ddp and str(cfg.trainer.get("devices")) != "1" and "submitit_launcher.SlurmLauncher" not in str(
            HydraConfig.get().launcher.get("_target_", "")):
        raise ValueError("trainer=ddp with several devices cannot run inside a local -m sweep (Lightning would start "
                         "the whole sweep again on every rank): run its jobs one by one, or on SLURM with "
                         "hydra/launcher=slurm_ddp")


def check_trainer(cfg: DictConfig) -> None:
    """An unknown or runner-owned ``trainer.*`` key as one ``ValueError``, before anything is
    written (Lightning itself would only fail when the first trainer is built, mid-run)."""
    check_local_ddp_sweep(cfg)
    target = get_class(cfg.trainer._target_)
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # a target taking **kwargs accepts anything
    for key in cfg.trainer:
        if str(key).startswith("_"):
            continue
        if key in RUNNER_TRAINER_KEYS:
            raise ValueError(f"trainer.{key} is set by the runner for each stage; remove it from the trainer config")
        if key not in params:
            raise ValueError(f"trainer.{key} is not an argument of {cfg.trainer._target_}")


def build_trainer(cfg: DictConfig, run_dir: Path, epochs: int, loggers: list, checkpoint: bool,
                  stage: str = "fit", single_device: bool = False, extra_callbacks: list | None = None) -> L.Trainer:
    """``cfg.trainer`` (conf/trainer/) instantiated, plus what differs between stages;
    ``single_device``: one device of the configured accelerator, whatever ``devices`` and
    ``strategy`` say (pretraining: see :func:`pretrained_backbone`)."""
    quiet_libraries()
    spec, extra = cfg.trainer, {}
    if single_device:
        spec = OmegaConf.merge(OmegaConf.masked_copy(spec, [k for k in spec if k not in ("devices", "strategy", "num_nodes")]),
                               {"devices": 1, "strategy": "auto", "num_nodes": 1})
        # not SLURM's environment, which a job of several tasks would make refuse one device
        extra["plugins"] = [LightningEnvironment()]
    # our own epoch-end checkpoint (checkpointing.py) instead of Lightning's ModelCheckpoint,
    # which with save_top_k=0 writes last.ckpt only when training ends (a killed run lost all)
    callbacks = [EpochCheckpoint(run_dir / CHECKPOINT_NAME)] if checkpoint else []
    callbacks += list(extra_callbacks or [])
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and interactive()
    if not bar:  # a log file or a table's job: a few progress lines instead of a bar
        callbacks.append(ProgressLines(stage))
    return instantiate(spec, max_epochs=epochs, logger=loggers or False, callbacks=callbacks,
                       enable_checkpointing=False, default_root_dir=run_dir, enable_progress_bar=bar, **extra)


def pretrain_config(cfg: DictConfig) -> dict:
    """The parts of ``cfg`` that define a pretrained backbone (its cache key)."""
    # the genuine-reward oracle a dataset may carry (GFP's proxy) does not change the data
    data = OmegaConf.to_container(cfg.dataset, resolve=True)
    data.pop("true_oracle", None)
    trainer = {k: cfg.trainer[k] for k in FIT_TRAINER_KEYS if k in cfg.trainer}
    return {"dataset": data, "process": cfg.process, "backbone": cfg.backbone, "pretrain": cfg.pretrain,
            "trainer": trainer}


def pretrained_backbone(cfg: DictConfig, dataset, process):
    """The pretrained backbone for this (dataset, process, backbone, pretrain) — trained once,
    then loaded from ``<cache_dir>/pretrain/<key>/backbone.pt`` by every run of a sweep.
    ``pretrain: null`` (``pretrain=null``) uses the backbone as instantiated (e.g. weights its
    constructor loaded from disk): no pretraining, no cache entry."""
    spec = cfg.get("pretrain")
    pretrains = spec is not None and "_target_" in spec
    # a cached backbone is shared by every seed of a sweep: its initial weights (and its whole
    # fit) come from the pretraining seed, which is part of the cache key, never the run's seed
    init_seed = int(spec.get("seed", 0)) if pretrains else int(cfg.seed)
    with seeded_draws(init_seed, "backbone"):
        backbone = instantiate(cfg.backbone)
    if not pretrains:
        # without a pretrain option only loose keys can remain (debug=smoke's shrunk budget)
        log.info("pretrain: none; the backbone is used as instantiated")
        return backbone

    def fit(folder: Path) -> None:
        module = instantiate(spec, backbone=backbone, process=process, dataset=dataset)
        log.info("pretraining %s: %d iterations x batch %d (%d epochs) -> %s", type(module).__name__,
                 module.iterations, module.batch_size, module.epochs, folder)
        loggers = [L.pytorch.loggers.CSVLogger(folder, name="", version="")]
        with no_global_draws("pretrain"):  # its data and noise draws take the module's own generators
            # on one device even under trainer=ddp: the cache key holds no device count, so a
            # cached backbone must not depend on it (and under DDP each rank would draw the same
            # data batches); a DDP run's other ranks start later and find it in the cache
            build_trainer(cfg, folder, module.epochs, loggers, checkpoint=False, stage="pretraining",
                          single_device=True).fit(module)
        torch.save(backbone.state_dict(), folder / "backbone.pt")

    def load(folder: Path):
        backbone.load_state_dict(torch.load(folder / "backbone.pt", map_location="cpu", weights_only=True))
        return backbone

    return cached("pretrain", pretrain_config(cfg), cfg.paths.cache_dir, fit, load)


def bind_reward(reward, dataset):
    """Rewards that read the data (oracles, the exact lookup) are declared ``_partial_: true``
    in their YAML and receive the dataset here."""
    return reward(dataset=dataset) if isinstance(reward, functools.partial) else reward


def component_seed(spec, cfg: DictConfig) -> int:
    """The seed a component's networks start from: its own ``seed`` (a cached oracle's, part
    of its cache key) or, for a component without one, the run's."""
    own = spec.get("seed") if isinstance(spec, DictConfig) else None
    return int(cfg.seed if own is None else own)


def build_reward(cfg: DictConfig, dataset):
    """The nominal reward (an oracle's network is built and fitted, or loaded, here)."""
    with seeded_draws(component_seed(cfg.reward, cfg), "reward"):
        return bind_reward(instantiate(cfg.reward), dataset)


def build_true_reward(cfg: DictConfig):
    """The genuine reward r where the task knows it (bound to the dataset later), or None."""
    if cfg.get("true_reward") is None:
        return None
    with seeded_draws(component_seed(cfg.true_reward, cfg), "true_reward"):
        return instantiate(cfg.true_reward)


def _prepend_csv(earlier: Path, curves: Path, resumed_at: int) -> None:
    """Curves of a resumed run: the rows logged before the step it resumed at (a killed
    run may have logged past its checkpoint: those steps were run again), then the new ones."""
    with earlier.open() as f:
        old = [row for row in csv.DictReader(f) if not row.get("step") or float(row["step"]) < resumed_at]
    new = []
    if curves.exists():
        with curves.open() as f:
            new = list(csv.DictReader(f))
    fields = list(dict.fromkeys([k for row in old + new for k in row]))
    with curves.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old + new)
    earlier.unlink()


@dataclass
class RunParts:
    """What a run is made of, built by :func:`build_parts`."""
    dataset: object
    reward: object
    true_reward: object
    method: L.LightningModule
    kind: str
    eval_metrics: list


def build_parts(cfg: DictConfig) -> RunParts:
    """The dataset, rewards and method of ``cfg`` (pretraining and oracle fits, cached, on the
    way); writes nothing outside the caches."""
    dataset = instantiate(cfg.dataset)  # cheap constructors first: their range checks fail before any write
    true_reward = build_true_reward(cfg)
    process = instantiate(cfg.process)
    sampler = instantiate(cfg.sampler, process=process)
    kind = sample_kind(dataset)  # a requested metric that cannot read it fails here, before any compute
    eval_metrics = build_metrics(cfg.eval.compute, cfg.eval.get("select"), kind)
    reward = build_reward(cfg, dataset)  # an oracle is fitted (or loaded) here, into the cache
    backbone = pretrained_backbone(cfg, dataset, process)  # writes only to the cache
    with seeded_draws(component_seed(cfg.get("true_reward"), cfg), "true_reward_fit"):
        true_reward = bind_reward(true_reward, dataset)  # a proxy oracle is fitted (or loaded) here
    with seeded_draws(cfg.seed, "method"):  # the method's own networks (critics, classifiers, ...)
        method = instantiate(cfg.method, backbone=backbone, sampler=sampler, reward=reward, dataset=dataset,
                             seed=cfg.seed, true_reward=true_reward)
    return RunParts(dataset, reward, true_reward, method, kind, eval_metrics)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Everything after validation. Returns the final metrics."""
    start = time.time()
    check_trainer(cfg)
    # first of all: is the folder this run's? (refused: one line, nothing touched)
    extendable = class_flags(cfg.method, ("extendable",)).get("extendable", True)
    # under DDP every rank runs this function: rank 0 owns the folder (a replaced run's move,
    # config.yaml, the curves), the other ranks only read it. Lightning's launcher starts them
    # when rank 0 reaches the fit; a cluster's scheduler starts them together, when a follower
    # may find a folder that rank 0 is replacing: it then stops with the folder error.
    leader = rank_zero_only.rank == 0
    claim = run_folder.claim(cfg if leader else OmegaConf.merge(cfg, {"replace_changed": False}), run_dir, extendable)
    log.info("run folder: %s", run_dir)
    done, last = run_dir / "metrics.json", run_dir / CHECKPOINT_NAME
    if cfg.get("skip_completed") and claim.finished and claim.kind == "same":
        log.info("already finished: %s", done)
        return json.loads(done.read_text())
    if last.exists():
        if claim.kind == "new":  # a checkpoint without the config.yaml that says whose it is
            raise run_folder.RunFolderError(f"{run_dir} holds a {CHECKPOINT_NAME} but no config.yaml, so whose run "
                                            "it is cannot be checked: give another hydra.run.dir, or delete the folder")
        check_checkpoint(last)
    parts = build_parts(cfg)
    dataset, reward, true_reward, method = parts.dataset, parts.reward, parts.true_reward, parts.method
    kind, eval_metrics = parts.kind, parts.eval_metrics
    run_dir.mkdir(parents=True, exist_ok=True)  # every constructor has checked its input by now
    if leader:
        if claim.kind == "extension":
            run_folder.begin_extension(run_dir, int(OmegaConf.load(run_dir / "config.yaml").method.iterations))
        OmegaConf.save(cfg, run_dir / "config.yaml")

    log.info("method %s | sampler %s, %d steps (dt=%.4g) | batch %d | %d iterations = %d epochs x %d | "
             "gradient window %s (k=%d) | samples simulated in training: %d",
             type(method).__name__, type(method.sampler).__name__, method.sampler.num_steps, method.sampler.dt, method.batch_size,
             method.iterations, method.epochs, method.iterations_per_epoch, method.grad_window.kind,
             method.grad_window.k, method.iterations * method.batch_size)

    if method.iterations > 0:
        curves, earlier = run_dir / "metrics.csv", run_dir / "metrics.before_resume.csv"
        resumed_at = checkpoint_step(last) if last.exists() else 0
        if last.exists():
            log.info("resuming from %s (step %d)", last, resumed_at)
            if leader and curves.exists():  # Lightning's CSV logger deletes an existing metrics.csv
                os.replace(curves, earlier)
        loggers = build_loggers(cfg, run_dir)
        trainer = build_trainer(cfg, run_dir, method.epochs, loggers, checkpoint=True, stage="fine-tuning",
                                extra_callbacks=training_image_grids(cfg, kind, dataset))
        with no_global_draws("finetune"):  # methods draw from their own generators (checked)
            trainer.fit(method, ckpt_path=str(last) if last.exists() else None, weights_only=True)
        costs = method.training_costs()  # summed over the ranks (a collective: before rank 0 goes on alone)
        if not trainer.is_global_zero:  # under DDP, rank 0 alone evaluates and writes
            return {}
        if earlier.exists():
            _prepend_csv(earlier, curves, resumed_at)
        device = trainer.strategy.root_device
    else:
        loggers = build_loggers(cfg, run_dir)  # no curves: the dashboards get the final numbers only
        # the device a fit would use (Pretrained rows evaluate where the others do); nothing is fitted
        device = build_trainer(cfg, run_dir, 0, [], checkpoint=False).strategy.root_device
        state = method.state_dict()
        for key in method.weights_from_source_keys():  # as in a fitted run's checkpoint
            state.pop(key)
        torch.save({"state_dict": state}, last)
        costs = method.training_costs()
    # what a method costs in reward evaluations (black-box budgets) and reward gradients
    train_queries, train_gradient_rows = costs["reward_queries"], costs["reward_gradient_rows"]
    method.to(device).eval()
    eval_cfg = EvalConfig(**cfg.eval.metrics)
    # the evaluation's two streams, by the project's rule: chain noise on the device, data draws
    # on the CPU; both derive from the run's seed, so seeds are independent replicates
    # (eval.seed picks another evaluation of the same run)
    generator = torch.Generator(device=device).manual_seed(derive_seed(int(cfg.seed), "eval", int(cfg.eval.seed)))
    data_generator = torch.Generator().manual_seed(derive_seed(int(cfg.seed), "eval_data", int(cfg.eval.seed)))
    sampling_queries = sampling_gradient_rows = 0

    def generate(n: int, generator: torch.Generator):  # counts what sampling itself asks of the reward
        nonlocal sampling_queries, sampling_gradient_rows
        before, gradients_before = method.reward_queries, method.reward_gradient_rows
        generation = method.generate(n, generator)
        sampling_queries += method.reward_queries - before
        sampling_gradient_rows += method.reward_gradient_rows - gradients_before
        return generation

    metrics, samples, rewards = evaluate(
        generate, reward.to(device), eval_cfg, eval_metrics, kind=kind, generator=generator,
        data_generator=data_generator, data=dataset, decode=method.decode,
        true_reward=None if true_reward is None else true_reward.to(device))
    for name, r in (("oracle", reward), ("true_oracle", true_reward)):
        for key, value in (getattr(r, "summary", None) or {}).items():
            if key.endswith(("r2", "accuracy")):  # an oracle's R², a classifier's accuracy
                metrics[f"{name}_{key}"] = value  # how far r_hat (and a proxy r) can be trusted
    metrics.update(method.extra_metrics())
    metrics["train_reward_queries"] = train_queries
    metrics["sampling_reward_queries_per_sample"] = sampling_queries / metrics["n_samples"]
    metrics["train_saved_for_backward_mb"] = costs["saved_for_backward_peak"] / 2**20
    metrics["train_reward_gradient_rows"] = train_gradient_rows
    metrics["sampling_reward_gradient_rows_per_sample"] = sampling_gradient_rows / metrics["n_samples"]
    trained = method.trained_parameter_counts()
    metrics["trained_policy_parameters"] = trained["policy"]
    metrics["trained_auxiliary_parameters"] = trained["auxiliary"]
    # what the job was launched with: tables select their rows' runs by these (report/experiments.py)
    metrics["overrides"] = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    for key in cfg.get("report_keys", []):  # the config values a table reports beside the metrics
        metrics[key] = OmegaConf.select(cfg, key)
    check_finite(metrics, "the final evaluation")  # before anything of the evaluation is written
    record_final(loggers, cfg, metrics)  # TensorBoard's HPARAMS tab, W&B's config and summary
    write_samples(run_dir, samples, rewards, kind, eval_cfg.saved_images, getattr(dataset, "pixel_range", (0.0, 1.0)))
    # timing apart from the numbers: the same command gives a byte-identical metrics.json
    (run_dir / "timing.json").write_text(json.dumps({"wall_seconds": time.time() - start}))
    # last: marks the run finished; allow_nan=False: strict JSON, whatever slipped through
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    log.info("metrics: %s", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))
    log.info("finished: %s", run_dir)
    return metrics


def check_finite(metrics: dict, where: str) -> None:
    """Divergence is an error, not a result: a non-finite number stops the run (one line)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise DivergenceError(f"the run diverged: {', '.join(f'{k} = {metrics[k]}' for k in bad)} in {where}; "
                              "nothing was written to metrics.json (lower method.lr, or clip with method.max_grad_norm)")
