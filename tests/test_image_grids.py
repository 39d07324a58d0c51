"""Image grids in the dashboards during training (src/diffusion_rl/image_grids.py): a digits
smoke run with TensorBoard and W&B (offline) writes one grid per epoch to both, and grids on or
off leave every number of the run unchanged."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import PYTHON, REPO_ROOT, cli_env, describe, path_overrides

pytest.importorskip("wandb")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

#: debug=smoke: 3 iterations, one per epoch -> a grid at steps 1, 2, 3
STEPS = [1, 2, 3]


def run(run_dir, cache, tmp_path, *extra):
    env = cli_env()
    env["WANDB_MODE"] = "offline"  # cli_env disables W&B; here its offline files are the point
    env.pop("WANDB_API_KEY", None)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / var.lower())
    args = ["debug=smoke", "dataset=digits", "method=reward_backprop", "logger=default", f"hydra.run.dir={run_dir}",
            *path_overrides(tmp_path, cache), *extra]
    proc = subprocess.run([PYTHON, "-m", "diffusion_rl", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    return run_dir


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grids")
    cache = tmp / "cache"
    on = run(tmp / "on", cache, tmp)  # fits the classifiers and pretrains the UNet into the cache
    off = run(tmp / "off", cache, tmp, "dashboard.image_grid.num_images=0")
    return on, off


def tb_images(run_dir):
    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc.Images("train/samples") if "train/samples" in acc.Tags()["images"] else []


def test_tensorboard_and_wandb_get_one_grid_per_epoch(grid_runs):
    on, _ = grid_runs
    events = tb_images(on)
    assert [e.step for e in events] == STEPS
    # 16 images of 8 x 8: 4 x 4 tiles with 1-pixel borders (37 pixels), each pixel drawn 4 x 4
    assert {(e.width, e.height) for e in events} == {(37 * 4, 37 * 4)}
    assert len({e.encoded_image_string for e in events}) > 1, "the grids follow the model"
    media = sorted(on.glob("wandb/**/media/images/train/samples_*.png"))
    assert len(media) == len(STEPS), media


def test_grids_leave_the_run_unchanged(grid_runs):
    on, off = grid_runs
    assert tb_images(off) == [] and not list(off.glob("wandb/**/media/images/**/*.png"))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (on, off))
    # the recorded command line differs by the switch itself; every number is the same, bytes and all
    assert b.pop("overrides") == a.pop("overrides") + ["dashboard.image_grid.num_images=0"]
    assert json.dumps(a) == json.dumps(b)
    for name in ("samples.npy", "rewards.npy", "metrics.csv"):
        assert (on / name).read_bytes() == (off / name).read_bytes(), name
    assert np.load(on / "samples.npy").shape[0] > 0
