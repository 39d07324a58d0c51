"""The shared evaluation as metric objects (conf/eval/): selection by sample kind, the
``<name>`` / ``<name>_ci95`` rule with Student-t intervals, and the samples written per kind."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from omegaconf import OmegaConf
from scipy.stats import t as student_t

from conftest import CONF_DIR, describe, last_error_line, path_overrides, run_cli
from diffusion_rl.core.trajectory import Generation
from diffusion_rl.data.toy import SwissRoll
from diffusion_rl.evaluation.evaluate import EvalConfig, build_metrics, evaluate
from diffusion_rl.evaluation.metrics import Metric, ci_key
from diffusion_rl.evaluation.samples import image_grid, write_samples

EVAL = OmegaConf.load(CONF_DIR / "eval" / "default.yaml")
CFG = EvalConfig(num_batches=3, batch_size=4, data_batch_size=5, chunk_size=5)
N = CFG.num_batches * CFG.batch_size


def names(kind, select=None):
    return [m.name for m in build_metrics(EVAL.compute, select, kind)]


def test_default_metrics_per_sample_kind():
    common = ["reward_mean", "reward_true_mean", "kl_path", "kl_init", "kl_div"]
    assert names("vectors") == [*common, "kl_data"]
    assert names("tokens") == [*common[:2], "reward_relaxed_mean", "reward_softmax_mean", *common[2:], "diversity"]
    assert names("images") == [*common, "diversity_pixels", "diversity_features"]
    assert all(isinstance(m, Metric) for m in build_metrics(EVAL.compute, None, "tokens"))


def test_select_narrows_and_rejects_a_metric_that_cannot_read_the_kind():
    assert names("tokens", ["diversity", "reward_mean"]) == ["diversity", "reward_mean"]
    with pytest.raises(ValueError, match="'diversity' reads tokens samples, but this run's samples are vectors"):
        build_metrics(EVAL.compute, ["diversity"], "vectors")
    with pytest.raises(ValueError, match="no metric 'nope'"):
        build_metrics(EVAL.compute, ["nope"], "vectors")
    with pytest.raises(ValueError, match="sample kind"):
        build_metrics(EVAL.compute, None, "audio")
    dropped = OmegaConf.merge(EVAL, {"compute": {"kl_data": None}})
    assert "kl_data" not in [m.name for m in build_metrics(dropped.compute, None, "vectors")]


def fake_generate(terms):
    """A method whose n-th sample is ``[n, -n] / N`` with KL terms ``scale * n``."""
    count = [0]

    def generate(n, generator):
        idx = torch.arange(count[0], count[0] + n, dtype=torch.float32)
        count[0] += n
        return Generation(torch.stack([idx, -idx], -1) / N, {k: s * idx for k, s in terms.items()})
    return generate


def run_eval(kind, terms, **kw):
    metrics = build_metrics(EVAL.compute, None, kind)
    return evaluate(fake_generate(terms), lambda x: x[:, 0] ** 2, CFG, metrics, kind=kind,
                    generator=torch.Generator(), data_generator=torch.Generator().manual_seed(0), **kw)


def t_interval(batch_values):
    v = np.asarray(batch_values, dtype=np.float64)
    return v.mean(), student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))


def test_every_metric_writes_its_value_and_t_interval():
    out, x, rewards = run_eval("vectors", {"kl_path": 1.0, "kl_init": 0.5}, data=SwissRoll(),
                               true_reward=lambda x: x[:, 1])
    assert x.shape == (N, 2) and rewards.shape == (N,)
    value_keys = ["reward_mean", "reward_true_mean", "kl_path", "kl_init", "kl_div", "kl_data"]
    assert sorted(out) == sorted(["n_samples", *value_keys, *map(ci_key, value_keys)])
    assert ci_key("reward_mean") == "reward_ci95" and ci_key("kl_div") == "kl_div_ci95"
    idx = torch.arange(N, dtype=torch.float64).reshape(CFG.num_batches, CFG.batch_size)
    for key, per_sample in [("reward_mean", (idx / N) ** 2), ("reward_true_mean", -idx / N), ("kl_path", idx),
                            ("kl_init", 0.5 * idx), ("kl_div", 1.5 * idx)]:
        mean, half = t_interval(per_sample.mean(1))
        assert out[key] == pytest.approx(mean, rel=1e-6), key
        assert out[ci_key(key)] == pytest.approx(half, rel=1e-6), key
    assert out["kl_div"] == pytest.approx(out["kl_path"] + out["kl_init"], rel=1e-12)


def test_metrics_with_nothing_to_measure_write_nothing():
    # no genuine reward, no kl_init, no data, a reward without features (pixel distances remain)
    out, _, _ = run_eval("images", {"kl_path": 1.0})
    assert sorted(out) == sorted(["n_samples", "reward_mean", "reward_ci95", "kl_path", "kl_path_ci95",
                                  "kl_div", "kl_div_ci95", "diversity_pixels", "diversity_pixels_ci95"])
    assert out["kl_div"] == out["kl_path"]


def test_diversity_reads_tokens():
    generate = fake_generate({"kl_path": 0.0})  # states [n, -n] / N: token n % 2 repeated 3 times
    metrics = build_metrics(EVAL.compute, ["diversity"], "tokens")
    out, x, _ = evaluate(generate, lambda x: x.sum(-1).float(), CFG, metrics, kind="tokens",
                         generator=torch.Generator(), data_generator=torch.Generator(),
                         decode=lambda s: (s[:, :1] * N).round().long().remainder(2).expand(-1, 3))
    assert torch.equal(x, torch.tensor([[0, 0, 0], [1, 1, 1]]).repeat(N // 2, 1))
    # in each batch of 4 (0, 1, 0, 1): 8 of the 12 ordered pairs differ, at distance 3
    assert out["diversity"] == pytest.approx(3 * 8 / 12) and out["diversity_ci95"] == 0.0


# ------------------------------------------------------------------ samples per kind


def test_vectors_and_tokens_are_written_whole(tmp_path):
    rewards = torch.arange(6.0)
    write_samples(tmp_path, torch.randn(6, 2, dtype=torch.float64), rewards, "vectors", saved_images=2)
    assert np.load(tmp_path / "samples.npy").dtype == np.float32 and np.load(tmp_path / "samples.npy").shape == (6, 2)
    write_samples(tmp_path, torch.randint(0, 4, (6, 8)), rewards, "tokens", saved_images=2)
    assert np.load(tmp_path / "samples.npy").dtype == np.int64 and np.load(tmp_path / "samples.npy").shape == (6, 8)
    assert not (tmp_path / "samples.png").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "rewards.npy"), rewards.numpy())


def test_images_write_a_bounded_npy_and_a_png_grid(tmp_path):
    images = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    write_samples(tmp_path, images, torch.arange(7.0), "images", saved_images=5)
    saved = np.load(tmp_path / "samples.npy")
    assert saved.shape == (5, 3, 8, 8) and saved.dtype == np.float32
    np.testing.assert_array_equal(saved, images[:5].numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "rewards.npy"), np.arange(5.0, dtype=np.float32))
    png = imread(tmp_path / "samples.png")[..., :3]  # 5 tiles: 3 a row, 2 rows, 1 px padding
    assert png.shape == (2 * 9 + 1, 3 * 9 + 1, 3)
    for i in range(5):
        top, left = 1 + (i // 3) * 9, 1 + (i % 3) * 9
        np.testing.assert_allclose(png[top:top + 8, left:left + 8], images[i].permute(1, 2, 0).numpy(), atol=1 / 255)
    assert (png[0] == 1.0).all() and (png[-9:-1, -9:-1] == 1.0).all()  # padding and the empty sixth tile: white


def test_image_grid_of_grey_images_and_bad_shapes():
    grey = np.full((1, 1, 2, 3), 0.25, dtype=np.float32)
    grid = image_grid(grey, pad=0)
    assert grid.shape == (2, 3, 3) and (grid == 0.25).all()
    with pytest.raises(ValueError):
        image_grid(np.zeros((2, 4, 8, 8)))


# ------------------------------------------------------------------ through the CLI


def test_a_metric_requested_for_the_wrong_kind_is_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["debug=smoke", "method=pretrained", "eval.select=[reward_mean,diversity]",
                    f"hydra.run.dir={run_dir}", *path_overrides(tmp_path)])
    assert proc.returncode == 2, describe(proc)
    assert last_error_line(proc) == ("error: eval.select: metric 'diversity' reads tokens samples, "
                                     "but this run's samples are vectors")
    assert not (tmp_path / "cache").exists() and not (run_dir / "config.yaml").exists()
