"""Network outputs of every prediction type, converted by the process in one place, and the
discrete VP chain's DDIM step against diffusers' ``DDIMScheduler`` on a tiny UNet."""

from __future__ import annotations

import pytest
import torch

from diffusion_rl.core.processes import BrownianBridgeProcess, DiscreteVPProcess, OUProcess, VPProcess
from diffusion_rl.core.samplers import DDIM, EulerMaruyama


def _exact_outputs(process, x0, eps, s):
    """What a perfect network of each prediction type outputs at ``x_s = alpha x0 + sigma eps``
    (given x0: the conditional targets of denoising training)."""
    alpha, sigma = (c.reshape(-1, 1) for c in process.marginal_coeffs(s))
    x = alpha * x0 + sigma * eps
    return x, {"score": -eps / sigma, "eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}


@pytest.mark.parametrize("process", [OUProcess(sigma=1.3, theta=0.7), VPProcess(),
                                     DiscreteVPProcess(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)],
                         ids=["ou_not_vp", "vp", "discrete_vp"])
def test_every_prediction_type_converts_to_the_same_score_eps_and_x0(process, float64):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    s = 0.05 + 0.9 * torch.rand(64, generator=g) * process.T
    x, outputs = _exact_outputs(process, x0, eps, s)
    for kind, out in outputs.items():
        process.prediction_type = kind
        torch.testing.assert_close(process.to_score(x, s, out), outputs["score"])
        torch.testing.assert_close(process.to_eps(x, s, out), eps)
        torch.testing.assert_close(process.denoise(x, s, out), x0)  # Tweedie, exact for the true x0
        torch.testing.assert_close(process.from_score(x, s, outputs["score"]), out)


def test_reverse_drift_reads_the_converted_score(float64):
    process = VPProcess(prediction_type="eps")
    x, s, eps = torch.randn(8, 2), torch.full((8,), 0.3), torch.randn(8, 2)
    _, sigma = process.marginal_coeffs(s)
    expected = VPProcess().reverse_drift(x, s, -eps / sigma.reshape(-1, 1))
    torch.testing.assert_close(process.reverse_drift(x, s, eps), expected)


def test_bad_prediction_types_are_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        VPProcess(prediction_type="noise")
    with pytest.raises(ValueError, match="prediction_type"):
        BrownianBridgeProcess(prediction_type="score")
    with pytest.raises(ValueError, match="Tweedie"):
        BrownianBridgeProcess().denoise(torch.zeros(2, 1), torch.ones(2), torch.zeros(2, 1))


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("K", [1, 7, 50])
def test_discrete_grid_is_diffusers_timesteps(spacing, offset, K):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(K)
    process = DiscreteVPProcess(timestep_spacing=spacing, steps_offset=offset)
    grid = process.time_grid(K)
    assert grid.shape == (K + 1,)
    assert grid[:-1].long().tolist() == sched.timesteps.tolist()
    assert grid[-1].item() == sched.timesteps[-1].item() - 1000 // K
    torch.testing.assert_close(process.alphas_cumprod, sched.alphas_cumprod)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # test code only: diffusers' constructors draw from the global RNG
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4).eval()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_chain_matches_diffusers_ddim_scheduler(eta, tmp_path):
    """A whole 10-step chain of our DDIM(eta) on SD 1.5's schedule equals diffusers' loop of
    ``DDIMScheduler.step`` with the same model, text embeddings and (eta = 1) the same
    ``variance_noise``; the UNet goes through save_pretrained / from_pretrained."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    _tiny_unet().save_pretrained(tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    process = DiscreteVPProcess()  # SD 1.5: scaled_linear, leading, steps_offset 1, abar_0 at the end
    sampler = DDIM(process, 10, eta=eta)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"text": torch.randn(2, 5, 12, generator=g)}

    def policy(x, s, c):
        return unet(x, process.time_scale * s, encoder_hidden_states=c["text"]).sample

    with torch.no_grad():
        traj = sampler.rollout(policy, x_init=x_T, cond=cond, generator=torch.Generator().manual_seed(4))
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              steps_offset=1, set_alpha_to_one=False, clip_sample=False)
        sched.set_timesteps(10)
        x = x_T
        for k, t in enumerate(sched.timesteps):
            eps = unet(x, t, encoder_hidden_states=cond["text"]).sample
            x = sched.step(eps, t, x, eta=eta, variance_noise=traj.noises[k] if eta > 0 else None).prev_sample
            torch.testing.assert_close(traj.states[k + 1], x, rtol=1e-4, atol=1e-5)
    assert (traj.stds > 0).all() == (eta > 0)


def test_discrete_process_has_no_sde():
    with pytest.raises(NotImplementedError):
        EulerMaruyama(DiscreteVPProcess(), 10).rollout(lambda x, s, c: x, 2, event_shape=(3,))


def test_deterministic_step_kl_is_the_same_for_every_prediction_type(float64):
    """The Girsanov cost of a deterministic step compares drifts, so an eps network and the
    score network it is equivalent to pay the same KL (the raw outputs differ by -sigma)."""
    from diffusion_rl.core.samplers import ODEEuler

    g = torch.Generator().manual_seed(1)
    x, k = torch.randn(6, 2, generator=g), torch.full((6,), 3)
    score, ref = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    by_score = ODEEuler(VPProcess(), 10)
    by_eps = ODEEuler(VPProcess(prediction_type="eps"), 10)
    s = by_score.times[k]
    eps_of = lambda sc: by_eps.process.from_score(x, s, sc)  # noqa: E731
    kl_score = by_score.step_kl(x, k, score, ref, None, None, torch.zeros(6))
    kl_eps = by_eps.step_kl(x, k, eps_of(score), eps_of(ref), None, None, torch.zeros(6))
    torch.testing.assert_close(kl_eps, kl_score)
    g2dt = by_score.process.g(s) ** 2 * (by_score.times[3] - by_score.times[4])
    torch.testing.assert_close(kl_score, 0.5 * g2dt * ((score - ref) ** 2).sum(-1))


def test_deterministic_discrete_steps_have_no_kl():
    sampler = DDIM(DiscreteVPProcess(), 4, eta=0.0)
    with pytest.raises(ValueError, match="no SDE"):
        sampler.rollout(lambda x, s, c: torch.zeros_like(x), 2, event_shape=(3,), reference=lambda x, s, c: x)
