"""Path consistency learning (methods/pcl.py, METHODS_SPEC §2.4) on the closed-form bed (§0.3).

(i) Lemma 4 in the project's indexing: with the exact soft values ``v_k`` and the exact optimal
steps ``p*_k`` (learnable variance ``sigma_k^2 / (1 + g_k)``), every detailed-balance,
sub-trajectory and trajectory-balance residual is 0 to machine precision, pointwise; a flipped
log-ratio sign or ``v_{k+1}`` in place of ``v_k`` is not.

(ii) Training in the fixed-variance class (affine score per step, a quadratic value per step
injected in place of the MLP), K = 5, T = 1, alpha = 0.5, 600 iterations of 1024 chains. The
terminal law is computed exactly from the learned coefficients. Measured over seeds 0-4 against
the fixed-variance optimum N(1.5974, 0.4629): |mean error| <= 0.0081 for every variant (the
shared SGD noise: the same seed moves all variants alike); variance error +0.0053..+0.0099 for
detailed balance with PCL's full residual gradient (a systematic bias, see methods/pcl.py),
<= 0.0061 for sub-trajectory (m = 2), <= 0.0030 for trajectory balance and <= 0.0021 for the
semi-gradient value. Largest error of the learned means m^theta_k(x) against m*_k(x) on
x in [-2, 2]: 0.118-0.134 (detailed, full), 0.051-0.066 (sub-trajectory), 0.010-0.025 (semi),
0.010-0.019 (trajectory). Tolerances: terminal mean 0.02, variance 0.015; the mean bounds below.

(iii) Negative control: the log-ratio sign flipped diverges (terminal mean ~ -700 after 200
iterations; here 150).
"""

from __future__ import annotations

import math

import gaussian_bed as bed
import pytest
import torch
from torch import Tensor, nn

from diffusion_rl.core.processes import OUProcess
from diffusion_rl.core.samplers import DDIM, EulerMaruyama
from diffusion_rl.core.trajectory import gaussian_log_prob
from diffusion_rl.evaluation.linear_gaussian import fixed_variance_optimum
from diffusion_rl.methods.pcl import PCL, consistency_residuals, log_ratio

K, T, ALPHA = 5, 1.0, 0.5
MEAN_TOL, VAR_TOL = 0.02, 0.015


# --- (i) the consistency equation with the exact soft values ------------------------------
def soft_values(chain, alpha):
    """``v_k(x) = -q_k (x - h_k)^2 + C_k`` (k = 0..K) and ``p*_k = N(S_k x + I_k, var_k / (1 + g_k))``."""
    q, h, C = [bed.LAM], [bed.TARGET], [0.0]
    slopes, intercepts, gains = [], [], []
    for k in reversed(range(chain.num_steps)):
        A, c, var = float(chain.A[k]), float(chain.c[k]), float(chain.var[k])
        g = 2 * q[0] * var / alpha
        slopes.insert(0, A / (1 + g))
        intercepts.insert(0, (c + g * h[0]) / (1 + g))
        gains.insert(0, g)
        q.insert(0, q[0] * A**2 / (1 + g))
        h.insert(0, (h[0] - c) / A)
        C.insert(0, C[0] - alpha / 2 * math.log(1 + g))
    return q, h, C, slopes, intercepts, gains


def gauss_logpdf(x: Tensor, mean: Tensor, var: float) -> Tensor:
    return -0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)


def test_exact_values_and_optimal_steps_satisfy_every_consistency(float64):
    chain = bed.pretrained_chain(bed.sampler(K, T))
    q, h, C, S, I, g = soft_values(chain, ALPHA)
    gen = torch.Generator().manual_seed(0)
    x = [math.sqrt(chain.prior_var) * torch.randn(256, generator=gen)]
    for k in range(K):  # a chain of the optimal (learnable-variance) policy
        var = float(chain.var[k]) / (1 + g[k])
        x.append(S[k] * x[k] + I[k] + math.sqrt(var) * torch.randn(256, generator=gen))
    v = lambda k, y: -q[k] * (y - h[k]) ** 2 + C[k]
    assert torch.allclose(v(K, x[K]), bed.reward()(x[K].unsqueeze(-1)))  # v_K = r
    # alpha [log p*_k - log p^pre_k] at the recorded pairs, with the exact (different) variances
    ratio = torch.stack([ALPHA * (gauss_logpdf(x[k + 1], S[k] * x[k] + I[k], float(chain.var[k]) / (1 + g[k]))
                                  - gauss_logpdf(x[k + 1], chain.A[k] * x[k] + chain.c[k], float(chain.var[k])))
                         for k in range(K)])
    values = torch.stack([v(k, x[k]) for k in range(K + 1)])
    for m in (1, 2, 3, K, K + 3):
        assert consistency_residuals(values, ratio, m).abs().max() < 1e-12, m
    # the errors the unit test exists for
    assert consistency_residuals(values, -ratio, 1).abs().max() > 0.5  # l^pre - l^theta
    shifted = torch.stack([v(k + 1, x[k]) for k in range(K)] + [values[K]])  # v_{k+1} for v_k
    assert consistency_residuals(shifted, ratio, 1).abs().max() > 0.5
    assert consistency_residuals(values, ratio.roll(1, 0), 1).abs().max() > 0.5  # step index off by one


def test_fixed_variance_log_ratio_is_the_log_density_difference(float64):
    gen = torch.Generator().manual_seed(1)
    x, m, m_pre = (torch.randn(4, 3, 7, generator=gen) for _ in range(3))
    std = torch.rand(4, generator=gen) + 0.1
    expected = gaussian_log_prob(x, m, std) - gaussian_log_prob(x, m_pre, std)
    assert torch.allclose(log_ratio(x, m, m_pre, std), expected, atol=1e-12)


# --- (ii) training in the fixed-variance class ----------------------------------------------
class QuadraticStepValue(nn.Module):
    """``V_k(x) = a_k x^2 + b_k x + c_k`` on the grid step nearest ``s``: it holds the on-policy
    value of every affine policy on this bed (the MLP's capacity is then not the question)."""

    def __init__(self, times: Tensor):
        super().__init__()
        self.register_buffer("grid", times[:-1].clone())
        self.coef = nn.Parameter(torch.zeros(times.numel() - 1, 3))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        c = self.coef[(s.reshape(-1, 1) - self.grid).abs().argmin(1)]
        return c[:, 0] * x[:, 0] ** 2 + c[:, 1] * x[:, 0] + c[:, 2]


class FlippedPCL(PCL):
    """Negative control: ``l^pre - l^theta`` in place of ``l^theta - l^pre``."""

    def log_ratio(self, *args):
        return -super().log_ratio(*args)


def train_pcl(iterations, cls=PCL, seed=0, **kw):
    sam = bed.sampler(K, T)
    method = cls(bed.AffineStepScore(sam.times), sam, bed.reward(), iterations=iterations, batch_size=1024,
                 lr=0.05, value_lr=0.05, seed=seed, kl_weight=ALPHA, **kw)
    method.reference = bed.AffineStepScore(sam.times).requires_grad_(False)
    method.value = QuadraticStepValue(sam.times)  # before configure_optimizers (bed.train calls it)
    bed.train(method, iterations)
    chain = bed.pretrained_chain(sam)
    with torch.no_grad():
        slopes, intercepts = bed.policy_means(sam, method.backbone)
        opt_slopes, opt_intercepts = fixed_variance_optimum(chain, ALPHA, bed.LAM, bed.TARGET)
        xs = torch.linspace(-2, 2, 9)
        mean_error = float(((slopes - opt_slopes)[:, None] * xs + (intercepts - opt_intercepts)[:, None]).abs().max())
        got = [float(v) for v in chain.terminal(slopes, intercepts)]
        optimum = [float(v) for v in chain.terminal(opt_slopes, opt_intercepts)]
    return got, optimum, mean_error


# (kwargs, largest |m^theta_k - m*_k| on [-2, 2]) — measured ranges in the module docstring
VARIANTS = {
    "detailed": ({}, 0.2),
    "detailed_semi_gradient": ({"value_gradient": "semi"}, 0.05),
    "subtrajectory": ({"consistency": "subtrajectory", "subtrajectory_m": 2}, 0.1),
    "trajectory": ({"consistency": "trajectory"}, 0.05),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_pcl_reaches_the_fixed_variance_optimum(float64, name):
    kw, mean_bound = VARIANTS[name]
    got, optimum, mean_error = train_pcl(600, **kw)
    assert abs(got[0] - optimum[0]) < MEAN_TOL and abs(got[1] - optimum[1]) < VAR_TOL, (got, optimum)
    assert mean_error < mean_bound, mean_error
    if name == "detailed":
        # the full residual gradient's bias (double sampling): 0.13 here against the semi-gradient's 0.016
        assert mean_error > 0.06, mean_error


# --- (iii) negative control and refusals ------------------------------------------------------
@pytest.mark.parametrize("consistency", ["detailed", "trajectory"])
def test_a_flipped_log_ratio_sign_diverges(float64, consistency):
    got, optimum, _ = train_pcl(150, cls=FlippedPCL, consistency=consistency)
    assert not abs(got[0] - optimum[0]) < 1.0, (got, optimum)  # NaN counts as diverged


@pytest.mark.parametrize("make, match", [
    (lambda: EulerMaruyama(OUProcess(T=T), K, final_noise=False), "final_noise"),
    (lambda: DDIM(OUProcess(T=T), K, eta=1.0), "step 4 .* std 0"),  # DDIM onto s = 0
    (lambda: DDIM(OUProcess(T=T), K, eta=0.0), "stochastic sampler"),
])
def test_steps_without_a_density_are_refused(make, match):
    sam = make()
    with pytest.raises(ValueError, match=match):
        PCL(bed.AffineStepScore(sam.times), sam, bed.reward(), iterations=1, batch_size=4, lr=0.01, kl_weight=ALPHA)


def test_bad_arguments_name_their_key():
    sam = bed.sampler(K, T)
    for kw, key in (({"kl_weight": 0.0}, "kl_weight"), ({"consistency": "db"}, "consistency"),
                    ({"subtrajectory_m": 0}, "subtrajectory_m"), ({"value_gradient": "td"}, "value_gradient")):
        with pytest.raises(ValueError, match=f"method.{key}"):
            PCL(bed.AffineStepScore(sam.times), sam, bed.reward(), iterations=1, batch_size=4, lr=0.01,
                **{"kl_weight": ALPHA, **kw})
