"""q-learning (Gao, Zha & Zhou 2024) and ELEGANT with its initial-distribution stage
(Uehara et al. 2024) against the exact optimum of the discretised chain (issue 8;
METHODS_SPEC §0.3; closed forms in ``diffusion_rl.evaluation.linear_gaussian``).

The bed is tests/gaussian_bed.py: N(0, 1) data, the stationary OU process (exact score
``-x``), Euler–Maruyama, ``r(x) = -(x - 2)^2`` and the per-step affine score
``AffineStepScore`` (a policy class that holds every optimum below). Terminal means and
variances are computed *exactly* from the learned coefficients (the chain is affine), so
the only error is the optimiser's stationary noise; the tolerances are measured from it
(numbers at each test) and kept well inside the gap every negative control must cross.

**q-learning: which objective, which alpha.** Eq. (9) maximises
``E[beta h(Y_T) - int_0^T g^2/2 |a_t - grad log p_{T-t}(Y_t)|^2 dt]``; by Girsanov (eq. 11)
the integral is the path KL of the controlled SDE (10) to the true reverse SDE (6), so (9)
is ``beta (E h - (1/beta) KL)``: the KL-regularised objective with **alpha = 1 / beta** and
``r = h``. The exploratory version (15)-(16) adds ``gamma`` times the policy's entropy to the
running reward; Proposition 1 (eqs. 21-22) gives ``pi* = N(grad log p + grad V*, gamma/g^2 I)``:
the temperature fixes the action covariance, whose entropy ``d/2 log(2 pi e gamma / g^2)``
does not depend on the state or the mean, so **gamma does not enter the optimal mean** (the
HJB (23) differs from the KL-control one by that constant only). Algorithm 1's updates
(29)-(30) (the default, temporal-difference): in expectation the actor moves the mean
towards ``s_hat + grad_x V`` (Proposition 1's optimal mean once the critic is exact); the
Monte-Carlo martingale loss (``critic_target=monte_carlo``): its actor gradient is, in
expectation, a positively re-weighted (per step) score-function gradient of the discrete
objective ``E[beta h(x_K) + sum_k (r_k - q_k) dt]`` with ``q = gamma log pi`` (eq. 28). Both
have the per-step affine policy's optimum as their stationary point. In the discrete chain: for Euler–Maruyama the
running cost ``dt g^2/2 |mu_k - s_k|^2`` *is* the per-step KL ``|m^mu_k - m^pre_k|^2 /
(2 sigma_k^2)`` (mean difference ``g^2 dt (mu - s)``, ``sigma_k^2 = g^2 dt``), so the fine-tuned
means are :func:`fixed_variance_optimum` at ``alpha = 1/beta``. The exploratory noise (the
sampled action) only inflates each training step's variance to ``sigma_k^2 + (g^2 dt)^2 gamma
/ g^2``, which moves constants of the value, not the optimal means; ``generate`` samples the
mean policy. The reference of the KL is the *data* score (the paper's point), estimated by
the ratio estimator (18); here it equals the pretrained ``-x`` (the estimator's bias with
512 data samples, measured over 400 draws on x in [-1, 2.5] at every step time, is <= 0.016
in the score, i.e. <= 0.007 in a step mean: below the tolerance).

**ELEGANT: the optimum including the initial distribution.** The method controls two
fixed-variance Euler–Maruyama chains in sequence: the initial chain on ``[-T0, 0]`` (10 steps
of the stationary OU reference started at ``N(0, prior_var)``) and the drift chain on
``[0, T]``; its objective is ``E r(x_K) - alpha (KL_init + KL_drift)`` (eq. 5 with (9); the
evaluation adds both path KLs). Both chains are linear-Gaussian, so the optimum is
:func:`fixed_variance_optimum` of the *concatenated* chain (the joint optimum); the stages
reach it when stage 2 maximises ``E v_0(x_0) - alpha KL_init`` with ``v_0`` the drift chain's
soft value ``-q_0 (x - h_0)^2 + C`` (Corollary 2 / Theorem 2: the start tilted by
``exp(v_0 / alpha)``; the fixed-variance value has the same ``q_0, h_0``). ``kl_weight`` is
ELEGANT's alpha directly (reward weight 1). The bed is shortened to ``T = 0.3`` so that the
start matters: there the joint optimum N(1.4354, 0.2438) and the drift-only optimum from the
fixed prior N(1.3110, 0.2498) differ by 0.12 in the mean (at ``T = 1`` only by 0.02).

Finding (test_elegant_reaches_the_joint_optimum FAILS on the current code; reported, not
hidden): stage 1 regresses ``r(x_K)`` on ``x_0`` (the paper's §7.1 "numerically stable"
alternative), i.e. it learns ``E[r | x_0] = -lam (a x_0 + b - c)^2 - lam P`` instead of
``v_0 = -lam (a x_0 + b - c)^2 / (1 + 2 lam P / alpha) + C``. §7.1's argument (a constant
shift) needs ``r(x_K) = f(x_0) + noise independent of x_0``; a quadratic reward of a Gaussian
chain violates it, the curvature is ``1 + 2 lam P / alpha = 2.86`` times too large and the
start is over-tilted: the closed form of "stages 2-3 against E[r | x_0]" is N(1.5798, 0.2371),
and the method lands there (seeds 0-2: N(1.5767, 0.2373), N(1.5796, 0.2376), N(1.5794,
0.2372)), 0.14 above the joint optimum N(1.4354, 0.2438). With the exact soft value in stage
1 the same stages 2-3 reach the joint optimum (test below), so stages 2-3 are right and the
gap is stage 1's regression target. Fix (checked in a scratch run, not in src/): regress
the soft value itself, e.g. ``(exp((v - M)/alpha) - exp((r - M)/alpha))^2`` with ``M = max r``
(1000 value iterations: N(1.4337, 0.2487)) or ``v`` on ``alpha log mean_m exp(r_m/alpha)`` over
M = 128 pretrained continuations per ``x_0`` (appendix E.2; 200 iterations: N(1.4338, 0.2471)).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import gaussian_bed as bed
import diffusion_rl.methods.qlearning as qlearning_module
from diffusion_rl.data.toy import GaussianMixture1D
from diffusion_rl.evaluation.linear_gaussian import (LinearGaussianChain, affine_means, chain_of,
                                                     fixed_variance_optimum)
from diffusion_rl.methods.elegant import ELEGANT
from diffusion_rl.methods.qlearning import QLearning

MEAN_TOL, VAR_TOL = 0.03, 0.015  # on the exactly computed terminal mean / variance


def moments(chain: LinearGaussianChain, means) -> list[float]:
    return [float(v) for v in chain.terminal(*means)]


def assert_close(got, expected, what=""):
    assert abs(got[0] - expected[0]) < MEAN_TOL and abs(got[1] - expected[1]) < VAR_TOL, (what, got, expected)


def assert_far(got, expected, what=""):
    """A negative control must miss by three tolerances (so the test above it could not pass)."""
    assert abs(got[0] - expected[0]) > 3 * MEAN_TOL or abs(got[1] - expected[1]) > 3 * VAR_TOL, (what, got, expected)


def train(method, iterations: int, optimiser_of_phase=None) -> None:
    """``method.update()`` with its own optimisers, outside Lightning; each optimiser's rate
    drops tenfold for the last third of the iterations it is used in (less stationary noise).
    ``optimiser_of_phase(i) -> index`` says which optimiser iteration ``i`` steps (ELEGANT's
    stages); without it all iterations are one phase and every optimiser decays together."""
    opts = method.configure_optimizers()
    opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
    method.optimizers = lambda: opts
    method.manual_backward = lambda loss: loss.backward()
    phase_of = optimiser_of_phase or (lambda i: None)
    spans: dict = {}
    for i in range(iterations):
        spans.setdefault(phase_of(i), []).append(i)
    decay_at = {p: idx[(2 * len(idx)) // 3] for p, idx in spans.items()}
    for i in range(iterations):
        p = phase_of(i)
        if i == decay_at[p]:
            for opt in (opts if p is None else [opts[p]]):
                for group in opt.param_groups:
                    group["lr"] /= 10
        method.update()


# ---------------------------------------------------------------------------------------
# q-learning
# ---------------------------------------------------------------------------------------
QK, QT = 5, 1.0  # the bed of test_closed_form_optimum.py
BETA, GAMMA = 2.0, 2.0  # alpha = 1/beta = 0.5; the wrong readings gamma, gamma/beta, beta are 2, 1, 2
Q_ITERATIONS, Q_BATCH, Q_DATA = 600, 512, 512


def qlearning(seed=0, **kw) -> QLearning:
    sam = bed.sampler(QK, QT)
    return QLearning(bed.AffineStepScore(sam.times), sam, bed.reward(), iterations=Q_ITERATIONS, batch_size=Q_BATCH,
                     lr=0.05, seed=seed, reward_weight=BETA, temperature=GAMMA, delta=1e-4, data_samples=Q_DATA,
                     value_lr=1e-2, dataset=GaussianMixture1D([1.0], [0.0], [1.0]), **kw)


def qlearning_optimum(alpha: float) -> list[float]:
    chain = bed.pretrained_chain(bed.sampler(QK, QT))
    return moments(chain, fixed_variance_optimum(chain, alpha, bed.LAM, bed.TARGET))


def qlearning_terminal(method) -> list[float]:
    """The evaluated (mean-policy) chain's exact terminal law."""
    with torch.no_grad():
        return moments(bed.pretrained_chain(method.sampler), bed.policy_means(method.sampler, method.backbone))


def exploratory_chain(method) -> LinearGaussianChain:
    """The training chain: the action ``a ~ N(mu, gamma/g^2)`` moves the mean by
    ``d mean / d a = g^2 dt`` times its noise, so step k's variance is ``sigma_k^2 +
    (g^2 dt)^2 gamma / g^2`` (Proposition 1's covariance pushed through the EM step)."""
    sam, chain = method.sampler, bed.pretrained_chain(method.sampler)
    x = torch.zeros(1, 1)
    extra = []
    for k in range(sam.num_steps):
        kk = torch.full((1,), k, dtype=torch.long)
        gain = sam.transition(x, kk, torch.ones_like(x))[0] - sam.transition(x, kk, torch.zeros_like(x))[0]
        g2 = sam.process.reverse_diffusion(sam.times[kk]) ** 2
        extra.append((gain[0, 0] ** 2 * GAMMA / g2[0]).to(chain.var))
    return LinearGaussianChain(chain.A, chain.c, chain.var + torch.stack(extra), chain.prior_mean, chain.prior_var)


@pytest.mark.parametrize("critic_target", ["td", "monte_carlo"])
def test_qlearning_reaches_the_fixed_variance_optimum_at_alpha_one_over_beta(critic_target):
    """Measured over seeds 0-2 at this budget against the optimum N(1.5974, 0.4629): TD
    N(1.5933, 0.4626), N(1.5877, 0.4644), N(1.5972, 0.4665); Monte-Carlo N(1.5958, 0.4599),
    N(1.5868, 0.4599), N(1.6031, 0.4648): |mean error| <= 0.011, |variance error| <= 0.004
    (ratio-estimator bias and SGD noise); tolerances 0.03 / 0.015. The wrong alpha readings
    (gamma = 2: N(0.9959, 0.6635); gamma/beta = 1: N(1.3297, 0.5434)) are 0.27 to 0.6 away,
    so the expectation pins the mapping."""
    optimum = qlearning_optimum(1 / BETA)
    for wrong_alpha in (GAMMA, GAMMA / BETA, BETA):
        assert_far(qlearning_optimum(wrong_alpha), optimum, f"alpha={wrong_alpha}")
    method = qlearning(critic_target=critic_target)
    train(method, Q_ITERATIONS)
    assert_close(qlearning_terminal(method), optimum, "mean-policy chain")

    # the training chain: same means, variance inflated by the temperature's action noise
    # (2^15 chains: s.e. 0.005 of the mean, 0.006 of the variance; 4 s.e. tolerance)
    n = 2**15
    method.batch_size = n
    with torch.no_grad():
        final = method.rollout(method._policy, with_reference=False).final[:, 0].double()
        expected = moments(exploratory_chain(method), bed.policy_means(method.sampler, method.backbone))
    se_mean, se_var = math.sqrt(expected[1] / n), expected[1] * math.sqrt(2 / n)
    assert abs(float(final.mean()) - expected[0]) < 4 * se_mean, (float(final.mean()), expected)
    assert abs(float(final.var()) - expected[1]) < 4 * se_var, (float(final.var()), expected)
    assert expected[1] - qlearning_terminal(method)[1] > 20 * se_var  # the inflation is visible

    # evaluation: eval_actions=mean generates the mean-policy chain (with its path KL),
    # sampled the exploratory one (every action drawn from pi, as the paper's simulator
    # (33); no path KL), from the evaluation's generator alone
    mean_policy = qlearning_terminal(method)
    training_state = method.generator.get_state()
    for eval_actions, law in (("mean", mean_policy), ("sampled", expected)):
        method.eval_actions = eval_actions
        gen = method.generate(n, torch.Generator().manual_seed(1))
        final = gen.states[:, 0].double()
        assert abs(float(final.mean()) - law[0]) < 4 * math.sqrt(law[1] / n), (eval_actions, float(final.mean()), law)
        assert abs(float(final.var()) - law[1]) < 4 * law[1] * math.sqrt(2 / n), (eval_actions, float(final.var()), law)
        assert ("kl_path" in gen.kl_terms) == (eval_actions == "mean")
    assert torch.equal(method.generator.get_state(), training_state)


def test_qlearning_with_the_temperature_as_a_reward_scale_misses_it(monkeypatch):
    """Negative control (a wrong temperature/weight mapping): the terminal reward divided by
    gamma, as in a soft-RL reading ``exp(r / gamma)``, makes the effective alpha gamma/beta = 1;
    the run must land on that closed form N(1.3297, 0.5434) (measured, TD, seeds 0-2:
    N(1.3247, 0.5395), N(1.3179, 0.5426), N(1.3226, 0.5464)), 0.27 below alpha = 1/beta's mean."""
    original = QLearning.score_samples
    monkeypatch.setattr(QLearning, "score_samples", lambda self, x: original(self, x) / self.temperature)
    method = qlearning()
    train(method, Q_ITERATIONS)
    got = qlearning_terminal(method)
    assert_far(got, qlearning_optimum(1 / BETA), "reward / temperature")
    assert_close(got, qlearning_optimum(GAMMA / BETA), "lands on alpha = gamma / beta")


def test_qlearning_without_the_running_kl_misses_it(monkeypatch):
    """Negative control: the running reward's score target replaced by the policy's own mean
    (detached), so ``r - q`` is a constant and the KL to the data score is gone: the chain
    heads for the reward's argmax (measured, TD, seeds 0-2, half the budget: N(1.89-1.92,
    0.427-0.433), against N(1.5974, 0.4629))."""
    method = qlearning()
    monkeypatch.setattr(qlearning_module, "ratio_score",
                        lambda process, x, s, data, delta: method.backbone(x, s).detach())
    train(method, Q_ITERATIONS // 2)
    assert_far(qlearning_terminal(method), qlearning_optimum(1 / BETA), "no running KL")


def test_qlearning_critic_learns_only_what_is_not_closed_form(monkeypatch):
    """``critic_entropy``: ``r - q`` holds the normaliser of ``q = gamma log pi``,
    ``c(s) = gamma d/2 log(2 pi gamma / g^2)`` per unit time, which does not depend on the
    state or the action. With the running reward's score equal to the policy mean and
    ``beta = 0`` the policy is optimal and V is that constant's integral alone, so the
    value the network learns is exactly 0 per step under ``closed_form``; under ``learned``
    every step's increment is ``c dt`` (the ~70-unit profile on the Swiss roll that TD's
    critic cannot fit well enough in x; conf/method/qlearning.yaml). ``c`` is checked against
    torch's own Gaussian normaliser: ``exp(q / gamma)`` must integrate to 1 over actions."""
    from diffusion_rl.backbones.mlp import MLPBackbone
    from diffusion_rl.core.processes import OUProcess
    from diffusion_rl.core.samplers import EulerMaruyama
    from diffusion_rl.data.toy import SwissRoll
    from diffusion_rl.rewards.base import BoxIndicator

    def build(critic_entropy):
        sampler = EulerMaruyama(OUProcess(T=5.0), 50)
        method = QLearning(MLPBackbone(2), sampler, BoxIndicator([-100.0, 0.0], [100.0, 100.0]), iterations=1,
                           batch_size=16, lr=1e-3, reward_weight=0.0, temperature=5.0, delta=1e-4,
                           data_samples=32, dataset=SwissRoll(noise=1.0), critic_entropy=critic_entropy)
        monkeypatch.setattr(qlearning_module, "ratio_score",
                            lambda process, x, s, data, delta: method.backbone(x, s).detach())
        with torch.no_grad():
            return method, method.critic_terms(method.rollout(method._policy, with_reference=False))

    _, closed = build("closed_form")
    assert closed["terminal"].abs().max() == 0 and closed["increments"].abs().max() < 1e-4
    method, learned = build("learned")
    g2 = method.sampler.process.reverse_diffusion(method.sampler.times[:-1]) ** 2  # [K]
    dt = method.sampler.times[:-1] - method.sampler.times[1:]
    action_law = torch.distributions.Normal(torch.zeros(()), (method.temperature / g2).sqrt())  # per coordinate
    normaliser = -method.temperature * 2 * action_law.log_prob(torch.zeros(()))  # gamma log int exp(q_c/gamma) da, d = 2
    expected = (normaliser * dt).unsqueeze(1).expand_as(learned["increments"])
    torch.testing.assert_close(learned["increments"], expected, rtol=1e-4, atol=1e-4)
    assert 60 < float(expected[:, 0].sum()) < 80  # the time profile the network would have to fit


# ---------------------------------------------------------------------------------------
# ELEGANT
# ---------------------------------------------------------------------------------------
EK, ET, ALPHA = 5, 0.3, 0.5  # a short drift chain: the learned start matters (see the module docstring)
N_VALUE, N_INITIAL, N_DRIFT = 200, 400, 600
E_BATCH = 1024


class QuadraticValue(nn.Module):
    """``v(x) = w0 + w1 x + w2 x^2`` (1-D): the class holds both ``v_0`` and ``E[r | x_0]``, so
    only stage 1's regression target decides what it learns."""

    def __init__(self, coefficients=(0.0, 0.0, 0.0)):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(coefficients, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, 0]
        return self.w[0] + self.w[1] * x + self.w[2] * x**2


class AffineInitialControl(bed.AffineStepScore):
    """The initial chain's score, one affine map per step of its own grid (the project's
    gain-wrapped backbone copy reads the drift chain's grid and could not hold the per-step
    optimum); ``gain`` only for ELEGANT's log line."""

    def __init__(self, times: Tensor, std2: float):
        K = times.numel() - 1
        super().__init__(times, torch.full((K,), -1 / std2), torch.zeros(K))  # the stationary score
        self.register_buffer("gain", torch.ones(()))


def elegant(initial=True, exact_value=False, seed=0, value_target="soft") -> ELEGANT:
    """ELEGANT on the bed; ``exact_value``: stage 1's value fixed (value_lr = 0) at the exact
    ``v_0`` instead of learned from zero."""
    sam = bed.sampler(EK, ET)
    n_initial = N_INITIAL if initial else 0
    total = N_VALUE + n_initial + N_DRIFT
    method = ELEGANT(bed.AffineStepScore(sam.times), sam, bed.reward(), iterations=total, batch_size=E_BATCH,
                     lr=0.2, seed=seed, kl_weight=ALPHA, value_fraction=N_VALUE / total,
                     initial_fraction=n_initial / total, initial_steps=10, initial_T=1.0,
                     value_lr=0.0 if exact_value else 0.1, initial_lr=0.2, value_target=value_target,
                     value_continuations=128)
    assert method.phase_ends == (N_VALUE, N_VALUE + n_initial, total)
    method.reference = bed.AffineStepScore(sam.times).requires_grad_(False)
    method.value_net = QuadraticValue()
    if exact_value:
        q0, h0, _, _ = soft_value_coefficients(method)
        method.value_net = QuadraticValue((-q0 * h0**2, 2 * q0 * h0, -q0))
    method.initial_control = AffineInitialControl(method.initial_sampler.times, method.initial_sampler.process.std**2)
    return method


def initial_chain(method) -> LinearGaussianChain:
    init = method.initial_sampler
    return chain_of(init, lambda x, s, c: init.process.stationary_score(x), prior_var=init.process.std**2)


def joint_chain(method) -> LinearGaussianChain:
    """The initial chain followed by the drift chain, from the stationary start N(0, prior_var)."""
    ic, dc = initial_chain(method), bed.pretrained_chain(method.sampler)
    return LinearGaussianChain(torch.cat([ic.A, dc.A]), torch.cat([ic.c, dc.c]), torch.cat([ic.var, dc.var]),
                               ic.prior_mean, ic.prior_var)


def soft_value_coefficients(method) -> tuple[float, float, float, float]:
    """``(q_0, h_0, a, P)``: pretrained ``x_K | x_0 ~ N(a x_0 + b, P)``; ``v_0(x) =
    alpha log E[exp(r/alpha) | x_0] = -lam (a x + b - c)^2 / (1 + 2 lam P/alpha) + C``."""
    dc = bed.pretrained_chain(method.sampler)
    a = float(torch.prod(dc.A))
    b, P = (float(v) for v in LinearGaussianChain(dc.A, dc.c, dc.var, 0.0, 0.0).terminal(dc.A, dc.c))
    q0 = bed.LAM * a**2 / (1 + 2 * bed.LAM * P / ALPHA)
    return q0, (bed.TARGET - b) / a, a, P


def elegant_targets(method) -> dict[str, list[float]]:
    full, dc, ic = joint_chain(method), bed.pretrained_chain(method.sampler), initial_chain(method)
    drift = fixed_variance_optimum(dc, ALPHA, bed.LAM, bed.TARGET)
    q0, h0, a, _ = soft_value_coefficients(method)
    # what stage 2 + 3 reach from stage 1's mean regression E[r | x_0] (curvature lam a^2)
    m0, v0 = ic.terminal(*fixed_variance_optimum(ic, ALPHA, bed.LAM * a**2, h0))
    return {
        "joint": moments(full, fixed_variance_optimum(full, ALPHA, bed.LAM, bed.TARGET)),
        "drift_only": moments(dc, drift),
        "mean_regression": moments(LinearGaussianChain(dc.A, dc.c, dc.var, float(m0), float(v0)), drift),
    }


def elegant_terminal(method) -> list[float]:
    with torch.no_grad():
        init = affine_means(method.initial_sampler, method.initial_control)
        drift = bed.policy_means(method.sampler, method.backbone)
        if not method.learns_initial:
            return moments(bed.pretrained_chain(method.sampler), drift)
        return moments(joint_chain(method), [torch.cat([i, d]) for i, d in zip(init, drift)])


def train_elegant(method) -> None:
    phase_index = {"drift": 0, "value": 1, "initial": 2}
    ends = method.phase_ends
    train(method, method.iterations,
          lambda i: phase_index["value" if i < ends[0] else "initial" if i < ends[1] else "drift"])


def test_elegant_closed_forms_are_distinguishable(float64):
    """The three laws the ELEGANT tests tell apart (no training)."""
    targets = elegant_targets(elegant())
    assert [round(v, 4) for v in targets["joint"]] == pytest.approx([1.4354, 0.2438], abs=2e-4)
    assert [round(v, 4) for v in targets["drift_only"]] == pytest.approx([1.3110, 0.2498], abs=2e-4)
    assert [round(v, 4) for v in targets["mean_regression"]] == pytest.approx([1.5798, 0.2371], abs=2e-4)
    assert_far(targets["drift_only"], targets["joint"])
    assert_far(targets["mean_regression"], targets["joint"])


def test_elegant_with_the_exact_soft_value_reaches_the_joint_optimum():
    """Stages 2-3 with stage 1's value fixed at the exact ``v_0`` (value_lr = 0): the start
    tilted by exp(v_0/alpha) and the optimal drift give the concatenated chain's optimum.
    Measured, seeds 0-2: N(1.4414, 0.2455), N(1.4366, 0.2444), N(1.4357, 0.2440) against
    N(1.4354, 0.2438): |mean error| <= 0.006, |variance error| <= 0.002 (SGD noise of stages 2
    and 3); tolerances 0.03 / 0.015."""
    method = elegant(exact_value=True)
    train_elegant(method)
    assert_close(elegant_terminal(method), elegant_targets(method)["joint"], "exact v_0")


def test_elegant_reaches_the_joint_optimum():
    """The whole method (value_target=soft: stage 1 regresses alpha log-mean-exp(r/alpha) over
    128 pretrained continuations of each x_0) against the joint optimum of both chains."""
    method = elegant()
    train_elegant(method)
    targets = elegant_targets(method)
    got = elegant_terminal(method)
    assert_close(got, targets["joint"], f"learned value coefficients {method.value_net.w.tolist()}; "
                 f"closed forms {targets}")


def test_elegant_with_the_papers_mean_value_lands_on_the_mean_regression_law():
    """Negative control, and what the paper's §7.1 stage 1 (value_target=mean, regress r on
    x_0: E[r | x_0], curvature lam a^2 instead of v_0's lam a^2 / (1 + 2 lam P / alpha)) does:
    the start is tilted too far and the method lands on the mean-regression closed form
    N(1.5798, 0.2371), 0.14 above the joint optimum's mean (measured before the soft option
    existed, seeds 0-2: mean 1.5767-1.5796)."""
    method = elegant(value_target="mean")
    train_elegant(method)
    got, targets = elegant_terminal(method), elegant_targets(method)
    assert_close(got, targets["mean_regression"], "mean regression")
    assert_far(got, targets["joint"], "mean regression vs joint")


def test_elegant_without_the_initial_stage_misses_the_joint_optimum():
    """Negative control: initial_fraction = 0 (drift control from the fixed prior) lands on the
    drift-only optimum N(1.3110, 0.2498) (measured, seeds 0-2: N(1.3147, 0.2509), N(1.3094,
    0.2493), N(1.3121, 0.2493)), 0.12 below the joint optimum's mean."""
    method = elegant(initial=False)
    train_elegant(method)
    got, targets = elegant_terminal(method), elegant_targets(method)
    assert_close(got, targets["drift_only"], "drift only")
    assert_far(got, targets["joint"], "drift only vs joint")


def test_elegant_without_the_initial_kl_misses_the_joint_optimum():
    """Negative control: stage 2 with its KL term gone (the reference is the control itself, so
    KL_init = 0 with zero gradient), given the exact v_0: the start collapses onto h_0 and the
    terminal mean goes to ~2.0 (measured, seeds 0-2: 1.98-2.00, against 1.4354)."""
    method = elegant(exact_value=True)
    method.initial_reference = method.initial_control
    train_elegant(method)
    assert_far(elegant_terminal(method), elegant_targets(method)["joint"], "no initial KL")
