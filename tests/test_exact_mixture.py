"""The 2-D mixture bench's closed forms (``dataset=gmm2d``, ``backbone=mixture_score``,
``method=mixture_target``): the tilt of a Gaussian mixture by a quadratic reward is a mixture
with known weights, means, widths and normaliser; the noised mixture's score is exact; and the
chain driven by the noised *tilted* mixture's score lands on the tilt up to its discretisation.
Each check compares against an independent estimate (importance sampling, autograd of the
exact log density), so a wrong formula fails it."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from diffusion_rl.data.toy import GaussianMixture2D

TARGET, SCALE = [0.4, 1.0], 1.0  # the bench's reward -|x - c|^2 (conf/reward/quadratic_2d.yaml)


def bench(num_steps: int = 20):
    """The bench's process, sampler, data law and pretrained (exact-score) backbone."""
    cfg = compose_config(["dataset=gmm2d", "sampler=euler_maruyama", f"sampler.num_steps={num_steps}"])
    process = instantiate(cfg.process)
    return process, instantiate(cfg.sampler, process=process), instantiate(cfg.dataset), instantiate(cfg.backbone, process=process)


@pytest.mark.parametrize("alpha", [0.25, 1.0, 4.0])
def test_the_tilt_matches_importance_sampling(alpha):
    """Self-normalised importance weights exp(r/alpha) on 400k data draws estimate the tilted
    component weights, the tilted mean and log Z = log E exp(r/alpha); the closed form must
    agree within a few Monte-Carlo standard errors."""
    _, _, data, _ = bench()
    x = data.sample(400_000, torch.Generator().manual_seed(0)).double()
    c = torch.tensor(TARGET, dtype=torch.float64)
    log_w = -SCALE * ((x - c) ** 2).sum(-1) / alpha
    weights = torch.softmax(log_w, 0)
    ess = 1 / (weights**2).sum()
    w, m, s, log_z = data.tilt_parameters(TARGET, SCALE, alpha)
    tilted = GaussianMixture2D(w, m, s)
    # the component of each draw by its data posterior (the modes are 8 sds apart: no overlap)
    minority = data.responsibilities(x)[:, 1]
    se = 1 / math.sqrt(float(ess))
    assert float((weights * minority).sum()) == pytest.approx(float(w[1]), abs=5 * se + 1e-3)
    mean_is = (weights[:, None] * x).sum(0)
    assert torch.allclose(mean_is, tilted.mean(), atol=5 * se * 2 + 1e-3)
    log_z_is = torch.logsumexp(log_w, 0) - math.log(x.shape[0])
    assert float(log_z_is) == pytest.approx(float(log_z), abs=5 * se + 1e-3)
    # the widths shrink as 1/v' = 1/s^2 + 2 lam / alpha
    assert torch.allclose(s**2, 1 / (1 / data.stds**2 + 2 * SCALE / alpha))


def test_the_bench_moves_mass_between_the_modes():
    """The point of the case: the tilt at alpha = 1 moves the minority mode from 0.3 to ~0.78
    (a method has to move mass between separated modes, not only shift one)."""
    _, _, data, _ = bench()
    w, _, _, _ = data.tilt_parameters(TARGET, SCALE, 1.0)
    assert float(w[1]) > 0.75 and float(data.weights[1]) == pytest.approx(0.3)


def test_the_backbone_is_the_exact_noised_score():
    """Zero residual at initialisation, and the score it converts is the gradient of the exact
    log density of the noised mixture (autograd of ``GaussianMixture2D.noised(...).log_prob``)."""
    process, _, data, backbone = bench()
    g = torch.Generator().manual_seed(1)
    for t in (0.01, 0.3, 0.9):
        x = 3 * torch.randn(64, 2, generator=g)
        s = torch.full((64,), t)
        alpha, sigma = process.marginal_coeffs(torch.tensor(t))
        noised = data.noised(float(alpha), float(sigma))
        x64 = x.double().requires_grad_(True)
        (exact,) = torch.autograd.grad(noised.log_prob(x64).sum(), x64)
        assert torch.allclose(backbone.exact_score(x, s).double(), exact, atol=1e-4)
        assert torch.equal(backbone.residual(x, s), torch.zeros_like(x))


def terminal_weights(sampler, policy, reference, law, n=20_000, seed=0):
    traj = sampler.rollout(policy, n, generator=torch.Generator().manual_seed(seed), event_shape=(2,), cond=None,
                           reference=reference, device=torch.device("cpu"))
    return law.responsibilities(traj.final.double()).mean(0), traj


def test_the_chains_land_on_their_laws_up_to_discretisation():
    """The exact data score on 20 Euler–Maruyama steps keeps the data's weights (0.7 / 0.3), and
    the noised tilted mixture's score reaches the tilt's (0.217 / 0.783): measured 0.690 and
    0.771 at 20 steps, 0.696 and 0.780 at 100 — the gap is the discretisation, shrinking with
    the steps; 20k samples give a standard error of 0.003."""
    _, sampler, data, backbone = bench(20)
    w, m, s, log_z = data.tilt_parameters(TARGET, SCALE, 1.0)
    tilted_policy = backbone.frozen_reference()
    for name, value in (("weights", w), ("means", m), ("stds", s)):
        getattr(tilted_policy, name).copy_(value)
    pre, _ = terminal_weights(sampler, backbone, backbone, data)
    assert float(pre[1]) == pytest.approx(0.3, abs=0.02)
    tilt, traj = terminal_weights(sampler, tilted_policy, backbone, GaussianMixture2D(w, m, s))
    assert float(tilt[1]) == pytest.approx(float(w[1]), abs=0.025)
    # the path KL of the optimal chain bounds KL(p_r || p) from above, and is close to it
    kl = GaussianMixture2D(w, m, s).expected_quadratic_reward(TARGET, SCALE) - float(log_z)
    assert kl <= float(traj.path_kl().mean()) <= kl + 0.15


def test_the_tilt_kl_is_the_mean_log_density_ratio():
    """``method=mixture_target``'s exact KL, E_{p_r} r / alpha - log Z, against the mean of
    log p_r(x) - log p(x) over draws of p_r (both densities exact)."""
    _, _, data, _ = bench()
    w, m, s, log_z = data.tilt_parameters(TARGET, SCALE, 1.0)
    tilted = GaussianMixture2D(w, m, s)
    # KL(p_r || p) = E_{p_r} r / alpha - log Z, and it is positive
    kl = tilted.expected_quadratic_reward(TARGET, SCALE) - float(log_z)
    assert kl > 0
    x = tilted.sample(200_000, torch.Generator().manual_seed(2)).double()
    log_ratio = tilted.log_prob(x) - data.log_prob(x)
    assert float(log_ratio.mean()) == pytest.approx(kl, abs=0.02)


def test_the_bench_metrics_measure_what_they_say():
    """``ModeWeights`` on exact draws of the tilt is its minority weight (to Monte-Carlo error;
    the data law's posterior would not be); ``Objective`` is mean r minus alpha times the KL
    terms' sum, batch by batch."""
    from diffusion_rl.evaluation.evaluate import EvalConfig
    from diffusion_rl.evaluation.metrics import EvalSamples, ModeWeights, Objective

    _, _, data, _ = bench()
    w, m, s, _ = data.tilt_parameters(TARGET, SCALE, 1.0)
    cfg = EvalConfig(num_batches=4, batch_size=5000)
    x = GaussianMixture2D(w, m, s).sample(20_000, torch.Generator().manual_seed(3))
    rewards, kl = torch.randn(20_000, generator=torch.Generator().manual_seed(4)), torch.rand(20_000)
    samples = EvalSamples(x=x, kind="vectors", rewards=rewards, kl_terms={"kl_path": kl, "kl_init": kl}, cfg=cfg, data=data)
    share = ModeWeights("w1", component=1, kl_weight=1.0, reward_target=TARGET, reward_scale=SCALE).batch_values(samples)
    assert float(share.mean()) == pytest.approx(float(w[1]), abs=0.015)
    objective = Objective("objective", kl_weight=0.5).batch_values(samples)
    expected = rewards.double().reshape(4, -1).mean(1) - 0.5 * 2 * kl.double().reshape(4, -1).mean(1)
    assert torch.allclose(objective, expected)
    assert Objective("objective", kl_weight=0.5).batch_values(
        EvalSamples(x=x, kind="vectors", rewards=rewards, kl_terms={}, cfg=cfg)) is None
