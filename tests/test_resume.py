"""A run interrupted after an epoch and started again in the same folder resumes from
``last.ckpt`` and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import describe, path_overrides, run_cli, run_cli_many

COMMON = ["debug=smoke", "method=dpok", "method.iterations_per_epoch=2", "seed=3"]


def load_state(run_dir):
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, swiss_cache):
    root = tmp_path_factory.mktemp("resume")
    paths = path_overrides(root, swiss_cache)
    dir_a, dir_b = root / "A", root / "B"
    cmd_a = [*COMMON, "method.iterations=4", f"hydra.run.dir={dir_a}", *paths]
    cmd_b1 = [*COMMON, "method.iterations=2", f"hydra.run.dir={dir_b}", *paths]
    cmd_b2 = [*COMMON, "method.iterations=4", f"hydra.run.dir={dir_b}", *paths]
    if list(swiss_cache.glob("pretrain/*/backbone.pt")):
        proc_a, proc_b1 = run_cli_many([cmd_a, cmd_b1], workers=2)
    else:  # the first run pretrains; the others must not race it for the cache entry
        proc_a = run_cli(cmd_a)
        proc_b1 = run_cli(cmd_b1)
    assert proc_b1.returncode == 0, describe(proc_b1)
    b1_metrics = json.loads((dir_b / "metrics.json").read_text())
    b1_state = load_state(dir_b)
    proc_b2 = run_cli(cmd_b2)
    return dict(a=(proc_a, dir_a), b2=(proc_b2, dir_b), b1_metrics=b1_metrics, b1_state=b1_state)


def test_runs_succeed_and_second_one_resumes(resumed):
    for key in ("a", "b2"):
        proc, _ = resumed[key]
        assert proc.returncode == 0, describe(proc)
    proc_a, _ = resumed["a"]
    proc_b2, _ = resumed["b2"]
    assert "resuming from" in proc_b2.stdout + proc_b2.stderr
    assert "resuming from" not in proc_a.stdout + proc_a.stderr
    # one epoch (of two iterations) was checkpointed before the resumed run's second epoch
    _, dir_b = resumed["b2"]
    assert resumed["b1_state"]["epoch"] < load_state(dir_b)["epoch"]


def test_resumed_run_ends_where_the_uninterrupted_run_ends(resumed):
    _, dir_a = resumed["a"]
    _, dir_b = resumed["b2"]
    ma = json.loads((dir_a / "metrics.json").read_text())
    mb = json.loads((dir_b / "metrics.json").read_text())
    for key in ("reward_mean", "kl_path", "kl_data"):
        assert mb[key] == pytest.approx(ma[key], abs=1e-6), key
    sa, sb = load_state(dir_a), load_state(dir_b)
    assert sa["epoch"] == sb["epoch"]
    assert sa["global_step"] == sb["global_step"]
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    for k in sa["state_dict"]:
        torch.testing.assert_close(sb["state_dict"][k], sa["state_dict"][k], rtol=0, atol=1e-7, msg=k)
    torch.testing.assert_close(sb["generator_state"], sa["generator_state"])


def test_resumed_run_trained_past_the_checkpoint(resumed):
    """The second half actually trained: the final weights differ from the epoch-1 checkpoint."""
    _, dir_b = resumed["b2"]
    final = load_state(dir_b)["state_dict"]
    first = resumed["b1_state"]["state_dict"]
    assert any(not torch.equal(final[k], first[k]) for k in final if k.startswith("backbone."))
    metrics = json.loads((dir_b / "metrics.json").read_text())
    assert metrics["kl_path"] != resumed["b1_metrics"]["kl_path"]
