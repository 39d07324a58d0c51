"""A run killed with SIGKILL and started again with the same command continues from its last
epoch-end checkpoint and ends with the same ``metrics.json`` and ``samples.npy`` as a run
never interrupted; a damaged ``last.ckpt`` is one line and nothing moved; a folder holding
another config's run is refused with every file untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO_ROOT, cli_env, describe, last_error_line, path_overrides, run_cli

#: long enough that a kill lands mid-run (~0.3 s per epoch of 5 iterations), short overall
DPOK = ["debug=smoke", "method=dpok", "method.iterations=40", "method.iterations_per_epoch=5",
        "method.batch_size=64", "sampler.num_steps=20", "seed=5"]
#: ELEGANT on TFBind8: stages value 2 / initial 2 / drift 8 iterations, one per epoch
ELEGANT = ["debug=smoke", "experiment=elegant_tfbind8", "method=elegant", "method.iterations=12",
           "method.iterations_per_epoch=1", "seed=2"]
DRIFT_STARTS_AT = 4  # iterations done before the drift stage (value 2 + initial 2)


def start(args, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "diffusion_rl", *args, f"hydra.run.dir={run_dir}"], cwd=REPO_ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after(proc: subprocess.Popen, ckpt: Path, ready=lambda state: True, timeout: float = 600) -> dict:
    """SIGKILL ``proc`` as soon as a checkpoint satisfying ``ready`` exists; returns that state."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and ckpt.stat().st_mtime_ns != seen:
            seen = ckpt.stat().st_mtime_ns
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if ready(state):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return state
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint to kill after (rc={proc.poll()}):\n{proc.stdout.read()[-3000:]}")


def killed_then_rerun(tmp_path: Path, cache: Path, args: list[str], ready) -> tuple[Path, Path, dict, str]:
    paths = path_overrides(tmp_path, cache)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = run_cli([*args, *paths, f"hydra.run.dir={straight}"])  # also fills the cache
    assert first.returncode == 0, describe(first)
    state = kill_after(start([*args, *paths], killed), killed / "last.ckpt", ready)
    assert not (killed / "metrics.json").exists()  # it really was cut short
    again = run_cli([*args, *paths, f"hydra.run.dir={killed}"])
    assert again.returncode == 0, describe(again)
    return straight, killed, state, again.stdout + again.stderr


def assert_same_results(straight: Path, killed: Path) -> None:
    for name in ("metrics.json", "samples.npy", "rewards.npy"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name


def test_dpok_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, swiss_cache):
    straight, killed, state, log = killed_then_rerun(tmp_path, swiss_cache, DPOK, ready=lambda s: s["epoch"] >= 0)
    assert "resuming from" in log
    assert_same_results(straight, killed)
    # the curves: each step once, as many rows as the uninterrupted run's
    import csv

    rows = {name: list(csv.DictReader((folder / "metrics.csv").open())) for name, folder in
            (("straight", straight), ("killed", killed))}
    steps = [r["step"] for r in rows["killed"]]
    assert len(steps) == len(set(steps)) == len(rows["straight"])


def test_elegant_killed_in_its_drift_stage_resumes_to_the_uninterrupted_result(tmp_path_factory, tmp_path):
    cache = tmp_path_factory.mktemp("tfbind8_cache")
    in_drift = lambda s: int(s["state_dict"]["iteration"]) > DRIFT_STARTS_AT  # noqa: E731
    straight, killed, state, log = killed_then_rerun(tmp_path, cache, ELEGANT, ready=in_drift)
    assert int(state["state_dict"]["iteration"]) < 12
    assert_same_results(straight, killed)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, swiss_cache):
    root = tmp_path_factory.mktemp("finished")
    args = ["debug=smoke", "method=dpok", *path_overrides(root, swiss_cache), f"hydra.run.dir={root / 'run'}"]
    proc = run_cli(args)
    assert proc.returncode == 0, describe(proc)
    return args, root / "run"


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_is_one_line_naming_the_file(finished_run, damage):
    args, run_dir = finished_run
    ckpt = run_dir / "last.ckpt"
    original = ckpt.read_bytes()
    (run_dir / "metrics.json").rename(run_dir / "metrics.json.keep")  # unfinished again
    ckpt.write_bytes(b"" if damage == "empty" else original[: len(original) // 2])
    try:
        before = snapshot(run_dir)
        proc = run_cli(args)
        assert proc.returncode == 2, describe(proc)
        line = last_error_line(proc)
        assert line.startswith("error:") and str(ckpt) in line and "delete it" in line, line
        assert "Traceback" not in proc.stderr
        after = snapshot(run_dir)
        after.pop("cli.log", None), before.pop("cli.log", None)
        assert after == before  # nothing renamed, nothing rewritten
    finally:
        ckpt.write_bytes(original)
        (run_dir / "metrics.json.keep").rename(run_dir / "metrics.json")


def test_folder_of_another_config_is_refused_untouched(finished_run):
    args, run_dir = finished_run
    before = snapshot(run_dir)
    proc = run_cli([*args, "method.kl_weight=0.5"])
    assert proc.returncode == 2, describe(proc)
    line = last_error_line(proc)
    assert line.startswith("error:") and str(run_dir) in line and "method.kl_weight" in line, line
    assert snapshot(run_dir) == before  # config.yaml, metrics, checkpoint and log as they were


def test_more_iterations_extend_a_finished_run(tmp_path, swiss_cache):
    paths = [*path_overrides(tmp_path, swiss_cache), f"hydra.run.dir={tmp_path / 'run'}"]
    base = ["debug=smoke", "method=dpok", "method.iterations_per_epoch=1"]
    assert run_cli([*base, "method.iterations=2", *paths]).returncode == 0
    proc = run_cli([*base, "method.iterations=4", *paths])
    assert proc.returncode == 0, describe(proc)
    assert "resuming from" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "metrics.iterations-2.json").exists()  # the shorter run's numbers kept
    back = run_cli([*base, "method.iterations=3", *paths])  # fewer is another run, not an extension
    assert back.returncode == 2 and "method.iterations" in last_error_line(back), describe(back)
