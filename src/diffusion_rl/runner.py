"""Stages of one run: (cached) pretraining → fine-tuning → shared evaluation → outputs.

Run outputs contract (read by ``scripts/make_table.py`` and other tools), all in ``run_dir``:
``config.yaml`` (composed config), ``metrics.json`` (flat final numbers), ``metrics.csv``
(curves, Lightning CSV logger), ``samples.npy`` (final evaluation samples; decoded tokens
``[N, L]`` for sequences), ``rewards.npy`` (their nominal rewards ``[N]``), ``last.ckpt``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .evaluation.evaluate import EvalConfig, evaluate
from .seeding import derive_seed

log = logging.getLogger(__name__)


def config_hash(*parts: DictConfig) -> str:
    text = "\n".join(OmegaConf.to_yaml(p, resolve=True, sort_keys=True) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_trainer(cfg: DictConfig, run_dir: Path, epochs: int, loggers: list, checkpoint: bool) -> L.Trainer:
    callbacks = []
    if checkpoint:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir, save_last=True, save_top_k=0,
                                                             every_n_epochs=1, enable_version_counter=False))
    return L.Trainer(max_epochs=epochs, logger=loggers or False, callbacks=callbacks,
                     accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, strategy=cfg.trainer.strategy,
                     enable_progress_bar=cfg.trainer.enable_progress_bar, enable_model_summary=False,
                     enable_checkpointing=checkpoint, log_every_n_steps=cfg.trainer.log_every_n_steps,
                     num_sanity_val_steps=0, deterministic=cfg.trainer.deterministic, default_root_dir=run_dir)


def pretrained_backbone(cfg: DictConfig, dataset, process):
    """The pretrained backbone for this (dataset, process, backbone, pretrain) — trained once,
    then loaded from ``<cache_dir>/pretrain/<hash>/backbone.pt`` by every run of a sweep."""
    backbone = instantiate(cfg.backbone)
    # the genuine-reward oracle a dataset may carry (GFP's proxy) does not change the data
    data = OmegaConf.to_container(cfg.dataset, resolve=True)
    data.pop("true_oracle", None)
    data_cfg = OmegaConf.create(data)
    key = config_hash(data_cfg, cfg.process, cfg.backbone, cfg.pretrain)
    folder = Path(cfg.paths.cache_dir) / "pretrain" / key
    weights = folder / "backbone.pt"
    if weights.exists():
        log.info("pretrained backbone: cached %s", weights)
        backbone.load_state_dict(torch.load(weights, map_location="cpu"))
        return backbone
    module = instantiate(cfg.pretrain, backbone=backbone, process=process, dataset=dataset)
    log.info("pretraining %s: %d iterations x batch %d (%d epochs) -> %s", type(module).__name__,
             module.iterations, module.batch_size, module.epochs, folder)
    folder.mkdir(parents=True, exist_ok=True)
    loggers = [L.pytorch.loggers.CSVLogger(folder, name="", version="")]
    build_trainer(cfg, folder, module.epochs, loggers, checkpoint=False).fit(module)
    OmegaConf.save(OmegaConf.create({k: cfg[k] for k in ("dataset", "process", "backbone", "pretrain")}), folder / "config.yaml")
    tmp = weights.with_suffix(".tmp")
    torch.save(backbone.state_dict(), tmp)
    os.replace(tmp, weights)  # atomic: a killed pretraining never leaves a half-written cache entry
    return backbone


def build_reward(cfg: DictConfig, dataset):
    """The nominal reward. Rewards learned from the data (oracles) are declared
    ``_partial_: true`` in their YAML and receive the dataset here."""
    reward = instantiate(cfg.reward)
    return reward(dataset=dataset) if isinstance(reward, functools.partial) else reward


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, spec in (cfg.logger or {}).items():
        if spec is None:
            continue
        kw = {"save_dir": str(run_dir)}
        if name == "wandb":
            online = os.environ.get("WANDB_MODE") == "online" or bool(os.environ.get("WANDB_API_KEY"))
            kw["offline"] = not online
        loggers.append(instantiate(spec, **kw))
    return loggers


def _prepend_csv(earlier: Path, curves: Path) -> None:
    """Curves of a resumed run: the rows logged before the interruption, then the new ones."""
    with earlier.open() as f:
        old = list(csv.DictReader(f))
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


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Everything after validation. Returns the final metrics."""
    start = time.time()
    done = run_dir / "metrics.json"
    if cfg.get("skip_completed") and done.exists():
        log.info("already finished: %s", done)
        return json.loads(done.read_text())
    dataset = instantiate(cfg.dataset)  # cheap constructors first: their range checks fail before any write
    process = instantiate(cfg.process)
    sampler = instantiate(cfg.sampler, process=process)
    reward = build_reward(cfg, dataset)  # an oracle is fitted (or loaded) here, into the cache
    backbone = pretrained_backbone(cfg, dataset, process)  # writes only to the cache
    method = instantiate(cfg.method, backbone=backbone, sampler=sampler, reward=reward, dataset=dataset, seed=cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)  # every constructor has checked its input by now
    OmegaConf.save(cfg, run_dir / "config.yaml")

    log.info("method %s | sampler %s, %d steps (dt=%.4g) | batch %d | %d iterations = %d epochs x %d | "
             "gradient window %s (k=%d) | samples simulated in training: %d",
             type(method).__name__, type(sampler).__name__, sampler.num_steps, sampler.dt, method.batch_size,
             method.iterations, method.epochs, method.iterations_per_epoch, method.grad_window.kind,
             method.grad_window.k, method.iterations * method.batch_size)

    last = run_dir / "last.ckpt"
    if method.iterations > 0:
        curves, earlier = run_dir / "metrics.csv", run_dir / "metrics.before_resume.csv"
        if last.exists():
            log.info("resuming from %s", last)
            if curves.exists():  # Lightning's CSV logger deletes an existing metrics.csv
                os.replace(curves, earlier)
        trainer = build_trainer(cfg, run_dir, method.epochs, build_loggers(cfg, run_dir), checkpoint=True)
        trainer.fit(method, ckpt_path=str(last) if last.exists() else None)
        if not trainer.is_global_zero:  # under DDP, rank 0 alone evaluates and writes
            return {}
        if earlier.exists():
            _prepend_csv(earlier, curves)
        device = trainer.strategy.root_device
    else:
        device = torch.device("cpu")
        torch.save({"state_dict": method.state_dict()}, last)

    method.to(device).eval()
    eval_cfg = EvalConfig(**cfg.eval.metrics)
    # the evaluation's two streams, by the project's rule: chain noise on the device, data draws on the CPU
    generator = torch.Generator(device=device).manual_seed(int(cfg.eval.seed))
    data_generator = torch.Generator().manual_seed(derive_seed(int(cfg.eval.seed), "data"))
    true_reward = dataset.true_reward() if hasattr(dataset, "true_reward") else None
    metrics, samples, rewards = evaluate(
        method.generate, reward.to(device), eval_cfg, generator=generator, data_generator=data_generator,
        data=dataset, decode=method.decode, true_reward=None if true_reward is None else true_reward.to(device))
    for name, r in (("oracle", reward), ("true_oracle", true_reward)):
        for key, value in (getattr(r, "summary", None) or {}).items():
            if key.endswith("r2"):
                metrics[f"{name}_{key}"] = value  # how far r_hat (and a proxy r) can be trusted
    metrics.update(method.extra_metrics())
    metrics["wall_seconds"] = time.time() - start
    # what the job was launched with: tables select their rows' runs by these (report/experiments.py)
    metrics["overrides"] = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    for key in cfg.get("report_keys", []):  # the config values a table reports beside the metrics
        metrics[key] = OmegaConf.select(cfg, key)
    samples = samples.cpu().numpy()
    np.save(run_dir / "samples.npy", samples.astype(np.float32 if samples.dtype.kind == "f" else np.int64))
    np.save(run_dir / "rewards.npy", rewards.cpu().numpy().astype(np.float32))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))  # last: marks the run finished
    log.info("metrics: %s", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))
    return metrics
