"""Guidance by a Gaussian reward model (methods/reward_guidance.py; ELEGANT App. E.3, Table 9):
the guided score's formula, its sign along a chain, and the method end to end on both of its
training sources."""

from __future__ import annotations

import json

import torch

from conftest import describe, path_overrides, run_cli_many
from diffusion_rl.core.processes import OUProcess
from diffusion_rl.core.samplers import EulerMaruyama
from diffusion_rl.methods.guidance import GuidedScore
from diffusion_rl.methods.reward_guidance import GaussianLogLikelihood


class StationaryScore(torch.nn.Module):
    """The exact score of N(0, 1) data under the OU process that keeps it: ``-x``."""

    def forward(self, x, s, cond=None):
        return -x


class Linear(torch.nn.Module):
    """``mu(x, s) = w . x`` (the time is ignored)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.as_tensor(w, dtype=torch.float32)

    def forward(self, x, s):
        return x.flatten(1) @ self.w


def test_guided_score_is_pretrained_minus_gamma_times_the_squared_error_gradient():
    process, gamma, y = OUProcess(T=1.0), 3.0, 1.5
    mu = Linear([0.5, -2.0])
    x, s = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.rand(6)
    with torch.no_grad():
        guided = GuidedScore(StationaryScore(), GaussianLogLikelihood(mu, y), gamma, process)(x, s)
    # grad_x of -(w.x - y)^2 / 2 is (y - w.x) w
    expected = -x + gamma * (y - mu(x, s))[:, None] * mu.w
    torch.testing.assert_close(guided, expected)
    assert not guided.requires_grad


def test_guidance_moves_the_chain_towards_its_target_and_nowhere_at_gamma_zero():
    """N(0, 1) data, mu(x) = x: a target above the data moves the terminal mean up, one below
    moves it down, gamma = 0 leaves the pretrained law (a flipped sign fails the first two)."""
    process = OUProcess(T=1.0)
    sampler = EulerMaruyama(process, 20)
    means = {}
    for name, (gamma, y) in {"up": (1.0, 2.0), "down": (1.0, -2.0), "off": (0.0, 2.0)}.items():
        policy = GuidedScore(StationaryScore(), GaussianLogLikelihood(Linear([1.0]), y), gamma, process)
        with torch.no_grad():
            final = sampler.rollout(policy, 4000, generator=torch.Generator().manual_seed(0), event_shape=(1,)).final
        means[name] = float(final.mean())
    assert means["up"] > 0.5 and means["down"] < -0.5, means
    assert abs(means["off"]) < 0.1, means  # the pretrained law: N(0, 1), 4,000 draws (sd of the mean 0.016)


def test_reward_guidance_end_to_end_on_data_rows_and_on_pretrained_samples(tmp_path):
    common = ["dataset=gaussian1d", "method=reward_guidance", "debug=smoke", "method.label_pool=64",
              "method.classifier_hidden=[16]", "method.target=1.0", "method.guidance_scale=1.0"]
    runs = {source: [*common, f"method.data_source={source}", *path_overrides(tmp_path / source),
                     f"hydra.run.dir={tmp_path}/{source}/run"] for source in ("dataset", "pretrained")}
    for (source, _), proc in zip(runs.items(), run_cli_many(list(runs.values()), workers=2)):
        assert proc.returncode == 0, f"{source}: {describe(proc)}"
        metrics = json.loads((tmp_path / source / "run" / "metrics.json").read_text())
        assert metrics["trained_auxiliary_parameters"] > 0 and metrics["trained_policy_parameters"] == 0, metrics
