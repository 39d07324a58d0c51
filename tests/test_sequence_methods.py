"""Every ELEGANT-paper method end to end on TFBind8 and the GFP proxy under ``debug=smoke``:
the run contract for sequences (decoded tokens in samples.npy, per-sample rewards, the
genuine / proxy reward, KL-Div and diversity in metrics.json, curves in metrics.csv), with one
oracle fit and one pretraining per dataset shared by all runs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from conftest import CONF_DIR, compose_config, describe, one_per_class, last_error_line, method_class, path_overrides, run_cli_many

#: every method that declares it works on tokens
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("[!_]*.yaml") if "tokens" in method_class(p.stem).sample_kinds)
#: the dataset alone: its preset brings its oracle, genuine reward, VP process and transformer
DATASETS = {"tfbind8": (8, 4), "gfp": (237, 20)}
N_SAMPLES = 64  # debug=smoke evaluation: 2 batches of 32


#: every method class on TFBind8 (the vector smoke test runs every YAML); on GFP (237
#: residues, the slow one) the classes whose sequence code differs: the relaxed reward's
#: gradient, a policy gradient's log-probabilities, staged value / initial nets, a classifier,
#: the enumeration's refusal, particles, a value network's guidance, a score-matching loss
GFP_METHODS = ["pretrained", "reward_backprop", "dpok", "elegant", "guidance", "exact_optimum", "smc",
               "value_weighted", "rw_mle_offline", "pcl"]
CASES = {("tfbind8", m) for m in one_per_class(METHODS)} | {("gfp", m) for m in GFP_METHODS}


@pytest.fixture(scope="module")
def sequence_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    cache = root / "cache"

    def command(dataset, method):
        return ["debug=smoke", f"dataset={dataset}", f"method={method}", f"hydra.run.dir={root / dataset / method}",
                *path_overrides(root, cache)]

    # first wave: one run per dataset fits its oracles and pretrains; the rest load the cache
    first = [(d, "pretrained") for d in DATASETS]
    rest = [(d, m) for d in DATASETS for m in METHODS if m != "pretrained" and (d, m) in CASES]
    results = dict(zip(first, run_cli_many([command(*k) for k in first], workers=2)))
    results.update(zip(rest, run_cli_many([command(*k) for k in rest], workers=2)))
    return {k: (proc, root / k[0] / k[1]) for k, proc in results.items()}, cache


@pytest.mark.parametrize("dataset, method", sorted(CASES))
def test_sequence_run_contract(sequence_runs, dataset, method):
    runs, _ = sequence_runs
    proc, run_dir = runs[(dataset, method)]
    if method == "exact_optimum" and dataset == "gfp":  # 20^237 proteins cannot be enumerated: one line
        assert proc.returncode == 2 and last_error_line(proc).startswith("error: refusing to enumerate"), describe(proc)
        assert not (run_dir / "metrics.json").exists()
        return
    assert proc.returncode == 0, describe(proc)
    length, vocab = DATASETS[dataset]

    samples = np.load(run_dir / "samples.npy")
    assert samples.shape == (N_SAMPLES, length) and samples.dtype == np.int64
    assert samples.min() >= 0 and samples.max() < vocab
    rewards = np.load(run_dir / "rewards.npy")
    assert rewards.shape == (N_SAMPLES,) and np.isfinite(rewards).all()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("reward_mean", "reward_true_mean", "kl_div", "diversity", "oracle_heldout_r2"):
        assert math.isfinite(metrics[key]), (key, metrics)
    assert metrics["reward_mean"] == pytest.approx(float(rewards.mean()), rel=1e-5)
    assert 0 <= metrics["diversity"] <= length
    # a chain's path KL is >= 0; SMC's KL is an estimate (E_W r / alpha - log Z) that may dip below
    assert metrics["kl_div"] >= (-0.05 if "kl_smc" in metrics else 0)
    if method == "pretrained":
        assert metrics["kl_div"] == 0
    assert {"pretrained", "guidance", "elegant", "nokl", "ppo_kl"} <= set(METHODS)
    if dataset == "tfbind8":
        assert 0 <= metrics["reward_true_mean"] <= 1  # the exact lookup of normalised E-scores
    else:
        assert "true_oracle_heldout_r2" in metrics  # the proxy r is a fitted oracle, said so

    if method_class(method).fine_tunes:
        # training moved the backbone away from the frozen reference. Not asserted for reward
        # backprop on GFP: its 20-iteration smoke backbone ends far off the simplex, where the
        # oracle's sigmoid saturates to exactly 0 or 1 in float32 and the gradient is exactly 0
        # (measured: relaxed r_hat 13/16 of the batch at 1.0); tfbind8 checks the same methods
        state = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        moved = any(not torch.equal(v, state["reference." + k[len("backbone."):]])
                    for k, v in state.items() if k.startswith("backbone."))
        assert moved or (dataset == "gfp" and method_class(method).needs_differentiable_reward), method
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        for curve in ("train/reward_true", "train/diversity"):
            assert any(r.get(curve) for r in rows), curve


def test_one_oracle_fit_and_one_pretraining_per_dataset(sequence_runs):
    runs, cache = sequence_runs
    assert all(proc.returncode == 0 for key, (proc, _) in runs.items() if key != ("gfp", "exact_optimum"))
    # TFBind8: r_hat; GFP: r_hat and the proxy r fitted on all rows
    assert len(list((cache / "oracle").iterdir())) == 3
    assert len(list((cache / "pretrain").iterdir())) == 2


@pytest.mark.parametrize("task_name", ["tfbind8", "gfp"])
def test_task_encode_decode_round_trip(task_name):
    """States are one-hot (TFBind8) or one-hot minus the wild type (GFP): decoding a noisy state
    near an encoded sequence gives the sequence back, and the wild type sits at the origin."""
    from conftest import REPO_ROOT
    from diffusion_rl.data.sequence_tasks import GFPTask, TFBind8Task

    data = REPO_ROOT.parent / "shared" / "data"
    task = TFBind8Task(data / "tfbind8") if task_name == "tfbind8" else GFPTask(data / "gfp", top_fraction=0.1)
    g = torch.Generator().manual_seed(0)
    tokens = task.train.tokens[torch.randint(0, len(task.train), (256,), generator=g)]
    x = task.encode(tokens)
    assert torch.equal(task.decode(x), tokens)
    assert torch.equal(task.decode(x + 0.1 * torch.randn(x.shape, generator=g)), tokens)
    if task_name == "gfp":
        wild_type = task.decode(torch.zeros(1, *task.event_shape))[0]
        assert torch.equal(task.encode(wild_type[None])[0], torch.zeros(task.event_shape))
        assert (tokens != wild_type).sum(1).float().mean() < 10  # the top rows are few mutations away
