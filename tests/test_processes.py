"""Forward processes: closed-form Gaussian marginals against Monte Carlo simulation of the
forward SDE, variance preservation, the denoising score target, and the Brownian bridge."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_rl.core.processes import BrownianBridgeProcess, OUProcess, VPProcess

pytestmark = pytest.mark.usefixtures("float64")


def simulate_forward(process, x0: torch.Tensor, s_end: float, steps: int, n: int, seed: int) -> torch.Tensor:
    """Euler–Maruyama on ``dx = f(x, s) ds + g(s) dW`` from ``x0`` (shape ``[d]``) to ``s_end``."""
    gen = torch.Generator().manual_seed(seed)
    x = x0.expand(n, -1).clone()
    ds = s_end / steps
    for i in range(steps):
        s = torch.full((n,), i * ds)
        g = process.g(s).reshape(-1, 1)
        x = x + process.f(x, s) * ds + g * math.sqrt(ds) * torch.randn(x.shape, generator=gen)
    return x


@pytest.mark.parametrize(
    "process, s_end",
    [
        (OUProcess(T=5.0), 0.7),  # the paper's OU (theta = 1, sigma = sqrt 2)
        (OUProcess(T=5.0, theta=0.6, sigma=0.9), 1.5),  # a non-variance-preserving OU
        (VPProcess(), 0.3),  # linear beta, time-dependent coefficients
        (VPProcess(beta_min=0.5, beta_max=5.0), 0.8),
    ],
    ids=["ou-vp", "ou-general", "vp-default", "vp-mild"],
)
def test_marginal_matches_monte_carlo(process, s_end):
    n, steps = 20000, 1000
    x0 = torch.tensor([1.3, -0.4])
    x = simulate_forward(process, x0, s_end, steps, n, seed=1)
    alpha, sigma = process.marginal_coeffs(torch.tensor(s_end))
    mean_exact, std_exact = alpha * x0, sigma.expand(2)
    mean_mc, std_mc = x.mean(0), x.std(0)
    # 5 standard errors of the MC estimate, plus a little for the O(ds) discretisation
    tol_mean = 5 * std_exact / math.sqrt(n) + 3e-3
    tol_std = 5 * std_exact / math.sqrt(2 * n) + 3e-3
    assert torch.all((mean_mc - mean_exact).abs() < tol_mean), (mean_mc, mean_exact)
    assert torch.all((std_mc - std_exact).abs() < tol_std), (std_mc, std_exact)


def test_marginal_helper_broadcasts_per_sample_times():
    process = VPProcess()
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.1, 0.5, 0.9])
    mean, std = process.marginal(x0, s)
    alpha, sigma = process.marginal_coeffs(s)
    assert mean.shape == (3, 2) and std.shape == (3, 1)
    torch.testing.assert_close(mean, alpha[:, None] * x0)
    torch.testing.assert_close(std[:, 0], sigma)


def test_ou_and_vp_drift_diffusion_formulas():
    s = torch.tensor([0.0, 0.3, 1.0])
    x = torch.tensor([[1.0], [2.0], [-3.0]])
    ou = OUProcess(theta=0.6, sigma=0.9)
    torch.testing.assert_close(ou.f(x, s), -0.6 * x)
    torch.testing.assert_close(ou.g(s), torch.full((3,), 0.9))
    vp = VPProcess(beta_min=0.1, beta_max=20.0)
    beta = 0.1 + s * 19.9
    torch.testing.assert_close(vp.f(x, s), -0.5 * beta[:, None] * x)
    torch.testing.assert_close(vp.g(s), beta.sqrt())


@pytest.mark.parametrize("s", [0.0, 1e-3, 0.1, 0.5, 1.0, 2.5, 5.0])
def test_ou_theta1_sigma_sqrt2_is_variance_preserving(s):
    alpha, sigma = OUProcess(theta=1.0, sigma=math.sqrt(2.0)).marginal_coeffs(torch.tensor(s))
    assert (alpha**2 + sigma**2).item() == pytest.approx(1.0, abs=1e-12)
    assert alpha.item() == pytest.approx(math.exp(-s), rel=1e-12)


def test_general_ou_is_not_variance_preserving():
    alpha, sigma = OUProcess(theta=0.6, sigma=0.9).marginal_coeffs(torch.tensor(1.0))
    assert abs((alpha**2 + sigma**2).item() - 1.0) > 0.1


def test_vp_alpha_is_exp_of_half_integrated_beta():
    process = VPProcess(beta_min=0.1, beta_max=20.0)
    for s in (0.05, 0.4, 1.0):
        grid = torch.linspace(0, s, 20001)
        integral = torch.trapezoid(process.beta(grid), grid)
        alpha, sigma = process.marginal_coeffs(torch.tensor(s))
        assert alpha.item() == pytest.approx(math.exp(-0.5 * integral.item()), rel=1e-6)
        assert (alpha**2 + sigma**2).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("process", [OUProcess(), OUProcess(theta=0.6, sigma=0.9), VPProcess()],
                         ids=["ou", "ou-general", "vp"])
def test_conditional_score_is_grad_of_gaussian_log_density(process):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 3, generator=gen)
    x = torch.randn(5, 3, generator=gen).requires_grad_(True)
    s = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0])
    alpha, sigma = process.marginal_coeffs(s)
    log_p = torch.distributions.Normal(alpha[:, None] * x0, sigma[:, None].expand(5, 3)).log_prob(x).sum()
    (grad,) = torch.autograd.grad(log_p, x)
    torch.testing.assert_close(process.conditional_score(x.detach(), x0, s), grad)


def test_prior_sample_has_the_marginal_std_at_T():
    process = OUProcess(T=0.5)  # far from stationarity: sigma(T)^2 = 1 - e^-1
    x = process.prior_sample((40000, 1), generator=torch.Generator().manual_seed(0))
    _, sigma = process.marginal_coeffs(torch.tensor(0.5))
    assert x.mean().abs().item() < 5 * sigma.item() / 200
    assert x.std().item() == pytest.approx(sigma.item(), rel=0.02)


def test_nonpositive_horizon_is_rejected():
    for cls in (OUProcess, VPProcess, BrownianBridgeProcess):
        with pytest.raises(ValueError, match="T"):
            cls(T=0.0)


# ------------------------------------------------------------------ Brownian bridge


def test_bridge_endpoints():
    process = BrownianBridgeProcess(eps=1.0)
    gen = torch.Generator().manual_seed(0)
    x_noise, x_data = torch.randn(8, 2, generator=gen), 3.0 + torch.randn(8, 2, generator=gen)
    x1, _ = process.bridge_sample(x_noise, x_data, torch.ones(8), generator=gen)
    torch.testing.assert_close(x1, x_noise, rtol=0, atol=1e-12)  # s = 1: the noise point
    x_small, target = process.bridge_sample(x_noise, x_data, torch.full((8,), 1e-8), generator=gen)
    torch.testing.assert_close(x_small, x_data, rtol=0, atol=1e-3)  # s -> 0: the data point
    torch.testing.assert_close(target, (x_data - x_small) / 1e-8)


def test_bridge_midpoint_moments():
    eps, s, n = 0.7, 0.3, 40000
    process = BrownianBridgeProcess(eps=eps)
    gen = torch.Generator().manual_seed(1)
    x_noise, x_data = torch.full((n, 1), -2.0), torch.full((n, 1), 4.0)
    x, target = process.bridge_sample(x_noise, x_data, torch.full((n,), s), generator=gen)
    std = eps * math.sqrt(s * (1 - s))
    assert x.mean().item() == pytest.approx(s * -2.0 + (1 - s) * 4.0, abs=5 * std / math.sqrt(n))
    assert x.std().item() == pytest.approx(std, rel=0.03)
    torch.testing.assert_close(target, (x_data - x) / s)


def test_bridge_is_drift_parametrised_and_has_no_ode():
    process = BrownianBridgeProcess(eps=0.5)
    x, out = torch.randn(4, 2), torch.randn(4, 2)
    s = torch.full((4,), 0.5)
    assert process.prediction_type == "drift"
    torch.testing.assert_close(process.reverse_drift(x, s, out), out)
    torch.testing.assert_close(process.reverse_diffusion(s), torch.full((4,), 0.5))
    with pytest.raises(NotImplementedError):
        process.ode_drift(x, s, out)
    with pytest.raises(NotImplementedError):
        process.marginal_coeffs(s)
