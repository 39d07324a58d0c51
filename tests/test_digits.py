"""The digits image task (METHODS_SPEC §6 "Digits"): sklearn's 8x8 digits, the UNet2DModel
backbone, the two classifier rewards, the image diversity metrics, and the methods end to end
on it under ``debug=smoke``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from matplotlib.image import imread

from conftest import compose_config, describe, method_class, path_overrides, run_cli_many
from diffusion_rl.data.digits import Digits
from diffusion_rl.evaluation.evaluate import EvalConfig
from diffusion_rl.evaluation.metrics import EvalSamples, PairwiseDistance
from diffusion_rl.rewards.digits_classifier import DigitCNN, trained_digit_classifier
from diffusion_rl.seeding import seeded_draws

torch.set_num_threads(1)

#: the dataset and the companions its preset brings (the backbone's YAML reads the dataset)
DIGITS_CFG = compose_config(["dataset=digits"])


@pytest.fixture(scope="module")
def digits():
    return Digits(split_seed=0)


# ---------------------------------------------------------------- dataset


def test_digits_shape_range_and_draws(digits):
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert digits.event_shape == (1, 8, 8) and digits.sample_kind == "images"
    # sklearn's 0..16 grey levels, mapped onto [-1, 1] with both ends reached
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    levels = (digits.images + 1) / 2 * 16
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    draw = digits.sample(50, torch.Generator().manual_seed(3))
    assert draw.shape == (50, 1, 8, 8)
    assert torch.equal(draw, digits.sample(50, torch.Generator().manual_seed(3)))
    assert not torch.equal(draw, digits.sample(50, torch.Generator().manual_seed(4)))
    # decoding clips a state to the pixel range, nothing else
    x = torch.linspace(-3, 3, 64).reshape(1, 1, 8, 8)
    assert torch.equal(digits.decode(x), x.clamp(-1, 1))


def test_halves_are_disjoint_stratified_and_seeded(digits):
    first, second = digits.halves
    assert len(set(first.tolist()) & set(second.tolist())) == 0
    assert sorted(first.tolist() + second.tolist()) == list(range(len(digits)))
    counts = [torch.bincount(digits.labels[h], minlength=10) for h in (first, second)]
    assert (counts[0] - counts[1]).abs().max() <= 1  # half of every digit in each half
    assert (counts[0] >= 85).all()
    images, labels = digits.half(1)
    assert torch.equal(images, digits.images[second]) and torch.equal(labels, digits.labels[second])
    again, other = Digits(split_seed=0), Digits(split_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(again.halves, digits.halves))
    assert not torch.equal(other.halves[0], digits.halves[0])


# ---------------------------------------------------------------- backbone


def build_backbone(seed: int, **overrides):
    spec = DIGITS_CFG.backbone.copy()
    spec.update(overrides)
    with seeded_draws(seed, "backbone"):  # how the runner builds every backbone
        return instantiate(spec)


def test_unet_backbone_shape_size_and_seeded_init():
    state = torch.get_rng_state()
    net = build_backbone(0)
    assert torch.equal(torch.get_rng_state(), state)  # the build leaves the global stream alone
    assert net.event_shape == (1, 8, 8)
    assert 0.6e6 < sum(p.numel() for p in net.parameters()) < 0.8e6  # the spec's ~0.7 M
    gen = torch.Generator().manual_seed(0)
    x, s = torch.randn(5, 1, 8, 8, generator=gen), torch.rand(5, generator=gen)
    out = net(x, s)
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, net(x, s * 0.5))  # the time label matters
    same, other = build_backbone(0), build_backbone(1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    ref = net.frozen_reference()
    assert not any(p.requires_grad for p in ref.parameters())
    assert torch.equal(ref(x, s), net.eval()(x, s))


def test_unet_backbone_round_trips_through_diffusers_files(tmp_path):
    net = build_backbone(2).eval()
    net.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "config.json").exists()
    loaded = build_backbone(5, pretrained=str(tmp_path / "unet")).eval()  # other fresh weights, then the files'
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    x, s = torch.randn(3, 1, 8, 8), torch.rand(3)
    assert torch.equal(loaded(x, s), net(x, s))


# ---------------------------------------------------------------- classifier rewards


def fitted_classifier(digits, cache_dir, half: int, epochs: int = 3):
    with seeded_draws(0, "reward"):
        net = DigitCNN()
    return trained_digit_classifier(digits, net, cache_dir=cache_dir, half=half, digit=3, epochs=epochs)


def test_classifier_reward_is_accurate_cached_and_differentiable(digits, tmp_path):
    reward = fitted_classifier(digits, tmp_path, half=0)
    # accuracy on the other half, far above the 10 % of chance even after 3 epochs
    assert reward.summary["heldout_accuracy"] > 0.6 and reward.summary["half"] == 0
    held_images, held_labels = digits.half(1)
    predicted = reward.net(held_images).argmax(-1)
    assert reward.summary["heldout_accuracy"] == pytest.approx(float((predicted == held_labels).float().mean()))
    # the reward is log p(3 | x): a log-probability, highest on real 3s
    r = reward(held_images)
    assert r.shape == (len(held_labels),) and (r <= 0).all()
    assert r[held_labels == 3].mean() > r[held_labels != 3].mean() + 1.0
    # its gradient reaches the pixels, never the frozen weights
    x = held_images[:8].clone().requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.net.parameters())
    assert reward.features(x).shape == (8, 64)
    # cached: one entry; a second call loads the same weights; the other half is another entry
    again = fitted_classifier(digits, tmp_path, half=0)
    assert len(list((tmp_path / "oracle").iterdir())) == 1
    assert all(torch.equal(a, b) for a, b in zip(reward.state_dict().values(), again.state_dict().values()))
    other = fitted_classifier(digits, tmp_path, half=1)
    assert len(list((tmp_path / "oracle").iterdir())) == 2 and other.summary["half"] == 1


# ---------------------------------------------------------------- diversity metrics


class _Features(torch.nn.Module):
    """A reward whose features are the mean pixel (a 1-D feature space)."""

    def forward(self, x, cond=None):
        return x.flatten(1).sum(-1)

    def features(self, x):
        return x.flatten(1).mean(-1, keepdim=True)


def test_pairwise_distance_in_pixels_and_features():
    # one batch of three 1x2x2 images: all -1, all +1, all +1 -> pixel distances 4, 4, 0
    x = torch.tensor([-1.0, 1.0, 1.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    samples = EvalSamples(x=x, kind="images", rewards=torch.zeros(3), kl_terms={},
                          cfg=EvalConfig(num_batches=1, batch_size=3), reward_fn=_Features())
    pixels = PairwiseDistance("diversity_pixels", space="pixels").batch_values(samples)
    assert pixels.tolist() == pytest.approx([(4 + 4 + 0) * 2 / 6])
    features = PairwiseDistance("diversity_features", space="features").batch_values(samples)
    assert features.tolist() == pytest.approx([(2 + 2 + 0) * 2 / 6])
    samples.reward_fn = lambda x: x.sum()  # a reward without features: nothing to measure
    assert PairwiseDistance("diversity_features", space="features").batch_values(samples) is None
    with pytest.raises(ValueError, match="space"):
        PairwiseDistance("d", space="latents")


# ---------------------------------------------------------------- methods end to end

#: the methods the image task is run with: every method of the digits table (ELEGANT's image
#: baselines, the tutorial's, CTRL, the inference-time samplers) and one YAML of every other
#: method class that declares "images" among its sample kinds (test_every_image_method_class_runs)
METHODS = ["pretrained", "reward_backprop", "nokl", "truncation", "random_k", "elegant", "ddpo", "dpok",
           "ppo_kl", "ppo_kl_log_ratio", "soft_ppo", "rw_mle", "rw_mle_offline", "pcl", "ctrl",
           "ctrl_plain_critic", "guidance", "reward_guidance", "value_weighted", "value_weighted_tweedie", "svdd", "smc",
           "smc_twisted"]
N_SAMPLES = 64  # debug=smoke evaluation: 2 batches of 32


@pytest.fixture(scope="module")
def digit_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cache = root / "cache"

    def command(method):
        return ["debug=smoke", "dataset=digits", f"method={method}", f"hydra.run.dir={root / method}",
                *path_overrides(root, cache)]

    # the first run fits both classifiers and pretrains the UNet; the others load the cache
    results = dict(zip(METHODS[:1], run_cli_many([command(METHODS[0])])))
    results.update(zip(METHODS[1:], run_cli_many([command(m) for m in METHODS[1:]], workers=2)))
    return {m: (proc, root / m) for m, proc in results.items()}, cache


def test_every_image_method_class_runs():
    """A new method class that can sample images joins METHODS (its flags say so, not a list)."""
    from test_configs import options

    image_classes = {method_class(m) for m in options("method")
                     if "images" in method_class(m).sample_kinds and not method_class(m).example_overrides}
    assert image_classes == {method_class(m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_digits_run_contract(digit_runs, method):
    runs, cache = digit_runs
    proc, run_dir = runs[method]
    assert proc.returncode == 0, describe(proc)
    assert "images" in method_class(method).sample_kinds

    samples = np.load(run_dir / "samples.npy")
    assert samples.shape == (N_SAMPLES, 1, 8, 8) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1  # written in [0, 1] from the data's [-1, 1]
    png = imread(run_dir / "samples.png")
    assert png.shape[:2] == (8 * 9 + 1, 8 * 9 + 1)  # 8 x 8 tiles of 8 pixels, 1-pixel borders

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("reward_mean", "reward_true_mean", "kl_div", "diversity_pixels", "diversity_features",
                "oracle_heldout_accuracy", "true_oracle_heldout_accuracy"):
        assert math.isfinite(metrics[key]), (key, metrics)
    assert metrics["reward_mean"] <= 0 and metrics["reward_true_mean"] <= 0  # log-probabilities
    assert metrics["diversity_pixels"] > 0 and metrics["diversity_features"] > 0
    assert 0.1 < metrics["oracle_heldout_accuracy"] <= 1  # above chance even at the smoke budget
    # a chain's path KL is >= 0; SMC's is an estimate that may dip below
    assert metrics["kl_div"] >= (-0.05 if "kl_smc" in metrics else 0)
    if method == "pretrained":
        assert metrics["kl_path"] == 0
    rewards = np.load(run_dir / "rewards.npy")
    assert metrics["reward_mean"] == pytest.approx(float(rewards.mean()), rel=1e-5)

    state = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    reference = {k[len("reference."):]: v for k, v in state.items() if k.startswith("reference.")}
    changed = any(not torch.equal(backbone[k], reference[k]) for k in backbone)
    assert changed == method_class(method).fine_tunes, "the backbone moved iff the method fine-tunes it"
    # one pretrained UNet and two classifiers, shared by every run
    assert len(list((cache / "pretrain").iterdir())) == 1 and len(list((cache / "oracle").iterdir())) == 2
