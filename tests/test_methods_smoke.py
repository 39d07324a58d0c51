"""Every method end to end through the CLI under ``debug=smoke``: exit code 0 and the run
folder contract (config.yaml, metrics.json, metrics.csv, samples.npy, last.ckpt)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR, describe, method_class, path_overrides, run_cli_many

#: every method that declares it works on vectors (the exact optimum enumerates a token space:
#: tested in test_sequence_methods.py and test_report_elegant.py)
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")
                 if not p.stem.startswith("_") and "vectors" in method_class(p.stem).sample_kinds)
#: the 1-D example brings its differentiable reward -(x - 6)^2 and a 1-D backbone (its preset)
GMM = ["dataset=gmm1d"]

#: methods that backpropagate the reward: they need a differentiable one (the 1-D example's)
BACKPROP = {m for m in METHODS if method_class(m).needs_differentiable_reward}

#: the closed-form benches' presets (a method's example_overrides) -> the samples' dimension;
#: both rewards are quadratic, -|x - c|^2
OWN_DATASETS = {"dataset=gaussian1d": 1, "dataset=gmm2d": 2}

#: run name -> overrides
RUNS = {
    **{m: [f"method={m}", *(method_class(m).example_overrides or (GMM if m in BACKPROP else []))] for m in METHODS},
    "qlearning-ddim": ["method=qlearning", "sampler=ddim"],
    "qlearning-ode_euler": ["method=qlearning", "sampler=ode_euler"],
    "qlearning-gmm1d": ["method=qlearning", *GMM],
    # a bridge-matching pretrained backbone (drift-parametrised) under a policy-gradient method
    "dpok-bridge": ["method=dpok", "process=brownian_bridge", "pretrain=bridge_matching"],
}
def cfg_name(run: str) -> str:
    """The method option of a run name (``qlearning-ddim`` -> ``qlearning``)."""
    return run.split("-")[0]


#: smoke evaluation: 2 batches of 32
N_SAMPLES = 64


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, swiss_cache):
    """Runs every configuration once. The pretraining cache is shared, so each pretrained
    backbone (one per dataset) is trained once: a first wave holds one run per dataset, the
    rest reuse the cache."""
    root = tmp_path_factory.mktemp("smoke")

    def command(name):
        return ["debug=smoke", *RUNS[name], f"hydra.run.dir={root / name}", *path_overrides(root, swiss_cache)]

    first = ["dpok" if "dpok" in RUNS else next(iter(RUNS)), "qlearning-gmm1d"]
    rest = [n for n in RUNS if n not in first]
    results = dict(zip(first, run_cli_many([command(n) for n in first])))
    results.update(zip(rest, run_cli_many([command(n) for n in rest])))
    return {name: (results[name], root / name) for name in RUNS}, swiss_cache


def test_every_method_is_covered():
    assert {"ddpo", "dpok", "qlearning", "pretrained", "nokl", "truncation", "random_k"} <= set(METHODS)


@pytest.mark.parametrize("name", list(RUNS))
def test_smoke_run_writes_the_run_contract(smoke_runs, name):
    runs, _ = smoke_runs
    proc, run_dir = runs[name]
    assert proc.returncode == 0, describe(proc)
    own = next((dim for preset, dim in OWN_DATASETS.items() if preset in RUNS[name]), None)
    gmm = "gmm1d" in name or name in BACKPROP or own is not None  # reward -|x - c|^2
    dim = own or (1 if gmm else 2)

    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.method._target_ == f"{method_class(cfg_name(name)).__module__}.{method_class(cfg_name(name)).__name__}"
    assert cfg.sampler.num_steps == 4

    metrics = json.loads((run_dir / "metrics.json").read_text())
    # kl_div: the sum of the generation's KL terms (a chain's path KL; a particle sampler's estimate)
    keys = {"reward_mean", "reward_ci95", "kl_div", "n_samples", "train_reward_queries", "train_saved_for_backward_mb"}
    if not gmm:
        keys.add("kl_data")
    assert keys <= set(metrics), sorted(metrics)
    assert metrics["n_samples"] == N_SAMPLES
    for key in keys:
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["kl_div"] >= -0.05 and metrics["reward_ci95"] >= 0  # an estimate (SMC's) may dip below 0
    assert json.loads((run_dir / "timing.json").read_text())["wall_seconds"] > 0
    if gmm:
        assert metrics["reward_mean"] <= 0  # -(x - 6)^2, -(x - 2)^2
    else:
        assert 0 <= metrics["reward_mean"] <= 1  # box indicator

    samples = np.load(run_dir / "samples.npy")
    assert samples.shape == (N_SAMPLES, dim) and samples.dtype == np.float32
    assert np.isfinite(samples).all()

    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    reference = {k[len("reference."):]: v for k, v in state.items() if k.startswith("reference.")}
    assert backbone and backbone.keys() == reference.keys()
    changed = any(not torch.equal(backbone[k], reference[k]) for k in backbone)

    assert changed == method_class(cfg_name(name)).fine_tunes, "the backbone moved iff the method fine-tunes it"
    if name == "pretrained":
        assert metrics["kl_path"] == 0.0  # the evaluated policy is the reference
    # a Lightning fit saves its loops and the method's generators; a run with nothing to train
    # (the pretrained / target rows, inference-time samplers whatever `iterations` says) saves weights only
    trained = "generator_state" in ckpt
    if not trained:
        assert not method_class(cfg_name(name)).fine_tunes, "only a method that fine-tunes nothing may skip training"
        assert not (run_dir / "metrics.csv").exists()  # no training curve
        assert metrics["train_reward_queries"] == 0
    else:
        # guidance trains a classifier and leaves the score network as it was
        assert metrics["kl_div"] > 0 or not method_class(cfg_name(name)).fine_tunes
        assert metrics["train_reward_queries"] > 0 or not method_class(cfg_name(name)).fine_tunes
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        logged_steps = {r["step"] for r in rows if any(v for k, v in r.items() if k.startswith("train/"))}
        assert len(logged_steps) == cfg.method.iterations == 3
    if name == "guidance":
        assert any(k.startswith("classifier.") for k in state)
    if name == "elegant":
        assert any(k.startswith("value_net.") for k in state) and any(k.startswith("initial_control.") for k in state)
        assert metrics["kl_div"] == pytest.approx(metrics["kl_path"] + metrics["kl_init"])
    if name.startswith("qlearning"):
        assert any(k.startswith("value.") for k in state)


def test_pretraining_ran_once_per_dataset(smoke_runs):
    runs, cache = smoke_runs
    assert all(proc.returncode == 0 for proc, _ in runs.values())
    folders = sorted((cache / "pretrain").iterdir())
    datasets = {OmegaConf.load(f / "config.yaml").dataset._target_.split(".")[-1] for f in folders}
    assert datasets == {"SwissRoll", "GaussianMixture1D"}
    pretrainers = {OmegaConf.load(f / "config.yaml").pretrain._target_.split(".")[-1] for f in folders}
    assert pretrainers == {"ScoreMatching", "BridgeMatching"}
    # one per (dataset, pretraining): swiss roll DSM, swiss roll bridge, 1-D DSM
    assert len(folders) == 3 and all((f / "backbone.pt").exists() for f in folders)


def test_same_pretrained_backbone_for_every_swiss_roll_run(smoke_runs):
    runs, _ = smoke_runs
    refs = []
    for name, (proc, run_dir) in runs.items():
        if "gmm1d" in name or name in BACKPROP or "bridge" in name or set(OWN_DATASETS) & set(RUNS[name]):
            continue
        state = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        refs.append({k: v for k, v in state.items() if k.startswith("reference.")})
    for other in refs[1:]:
        assert all(torch.equal(other[k], refs[0][k]) for k in refs[0])
