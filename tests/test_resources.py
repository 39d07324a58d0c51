"""What a run costs, in metrics.json (the tutorial's Table 1 properties, measured): reward
queries in training and per sample at sampling time, rows a reward gradient reached, the
parameters trained beside the policy's, and the peak bytes autograd saves for one backward. Each number is checked against what the method must do by construction."""

from __future__ import annotations

import json

import pytest

from conftest import path_overrides, run_cli_many

B, ITERS, K = 16, 3, 4  # debug=smoke: batch 16, 3 iterations, 4 steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resources")
    variants = {
        "backprop_all": ["method=reward_backprop", "method.grad_window.kind=all"],
        "backprop_last": ["method=truncation", "method.grad_window.k=1"],
        "dpok": ["method=dpok", "method.minibatches=1"],
        "pretrained": ["method=pretrained"],
        "value_weighted": ["method=value_weighted"],
        "pcl": ["method=pcl"],
    }
    cmds = [["debug=smoke", "dataset=gmm1d", *o, f"hydra.run.dir={root / n}", *path_overrides(root)] for n, o in variants.items()]
    results = run_cli_many(cmds)
    for name, proc in zip(variants, results):
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    return {n: json.loads((root / n / "metrics.json").read_text()) for n in variants}


def test_training_reward_queries_count_the_rows_scored(runs):
    # one rollout scored per iteration
    for name in ("backprop_all", "backprop_last", "dpok"):
        assert runs[name]["train_reward_queries"] == ITERS * B, name
    assert runs["pretrained"]["train_reward_queries"] == 0
    # a chain sampler asks nothing of the reward beyond the evaluation's own scoring
    assert all(m["sampling_reward_queries_per_sample"] == 0 for m in runs.values())


def test_backprop_through_the_whole_chain_saves_more_than_its_last_step(runs):
    full, last = runs["backprop_all"]["train_saved_for_backward_mb"], runs["backprop_last"]["train_saved_for_backward_mb"]
    assert full > 2 * last > 0, (full, last)
    assert runs["pretrained"]["train_saved_for_backward_mb"] == 0


def test_reward_gradients_are_counted_only_where_a_backward_reaches_the_reward(runs):
    assert runs["backprop_all"]["train_reward_gradient_rows"] == ITERS * B
    assert runs["backprop_last"]["train_reward_gradient_rows"] == ITERS * B
    for name in ("dpok", "pretrained", "value_weighted", "pcl"):  # they only query the reward
        assert runs[name]["train_reward_gradient_rows"] == 0, name
    assert all(m["sampling_reward_gradient_rows_per_sample"] == 0 for m in runs.values())


def test_trained_parameters_split_the_policy_from_value_networks(runs):
    policy = runs["backprop_all"]["trained_policy_parameters"]
    assert policy > 0 and runs["backprop_all"]["trained_auxiliary_parameters"] == 0
    assert runs["dpok"]["trained_policy_parameters"] == policy  # the same backbone, all of it trained
    assert runs["pretrained"]["trained_policy_parameters"] == runs["pretrained"]["trained_auxiliary_parameters"] == 0
    # value-weighted sampling fits a value network and leaves the policy alone; PCL fits both
    assert runs["value_weighted"]["trained_policy_parameters"] == 0
    assert runs["value_weighted"]["trained_auxiliary_parameters"] > 0
    assert runs["pcl"]["trained_policy_parameters"] == policy
    assert runs["pcl"]["trained_auxiliary_parameters"] > 0
