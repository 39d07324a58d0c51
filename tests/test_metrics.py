"""Evaluation metrics (k-NN KL, mean ± 95% CI) and the nonparametric ratio score estimator."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import sem
from scipy.stats import t as student_t

from diffusion_rl.core.processes import OUProcess, VPProcess
from diffusion_rl.core.score_estimators import ratio_score
from diffusion_rl.data.toy import GaussianMixture1D
from diffusion_rl.evaluation.metrics import knn_kl, mean_ci95, mean_pairwise_distance


def gaussian_kl_isotropic(mu: torch.Tensor, s: float) -> float:
    """KL(N(0, I) || N(mu, s^2 I)) in d = len(mu) dimensions."""
    d = mu.numel()
    return 0.5 * (d / s**2 + (mu**2).sum().item() / s**2 - d + 2 * d * math.log(s))


# ------------------------------------------------------------------ k-NN KL


@pytest.mark.parametrize("mu, s", [((1.0, 0.0), 1.5), ((0.0, -0.7), 0.8), ((1.0, 0.5), 1.0)])
def test_knn_kl_matches_gaussian_kl(mu, s):
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor(mu)
    batches, n = 3, 2000
    x = torch.randn(batches, n, 2, generator=gen)
    y = mu + s * torch.randn(batches, n, 2, generator=gen)
    est = knn_kl(x, y)
    assert est.shape == (batches,)
    exact = gaussian_kl_isotropic(mu, s)
    assert est.mean().item() == pytest.approx(exact, abs=0.1)
    # each batch on its own is a consistent (noisier) estimate
    assert (est - exact).abs().max().item() < 0.2


def test_knn_kl_of_identical_distributions_is_near_zero():
    gen = torch.Generator().manual_seed(1)
    x = 0.3 + 2.0 * torch.randn(2, 2000, 2, generator=gen)
    y = 0.3 + 2.0 * torch.randn(2, 2000, 2, generator=gen)
    assert knn_kl(x, y).mean().abs().item() < 0.1


def test_knn_kl_is_invariant_to_a_common_scale_and_shift():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    y = 1.0 + torch.randn(500, 2, generator=gen, dtype=torch.float64)
    base = knn_kl(x, y)
    torch.testing.assert_close(knn_kl(3.0 * x - 5.0, 3.0 * y - 5.0), base)


def test_knn_kl_with_k_and_unequal_sizes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1500, 2, generator=gen)
    y = torch.tensor([0.5, 0.5]) + 1.2 * torch.randn(3, 2500, 2, generator=gen)
    exact = gaussian_kl_isotropic(torch.tensor([0.5, 0.5]), 1.2)
    assert knn_kl(x, y, k=3).mean().item() == pytest.approx(exact, abs=0.1)


def test_knn_kl_needs_enough_samples():
    with pytest.raises(ValueError):
        knn_kl(torch.randn(1, 2), torch.randn(5, 2))
    with pytest.raises(ValueError):
        knn_kl(torch.randn(5, 2), torch.randn(2, 2), k=3)


# ------------------------------------------------------------------ mean and CI


def test_mean_ci95_on_known_data():
    mean, half = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == pytest.approx(3.0)
    # Student-t with n - 1 = 4 degrees of freedom (2.776), unbiased std
    assert half == pytest.approx(2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5))
    mean, half = mean_ci95(torch.full((10,), 0.25))
    assert mean == pytest.approx(0.25) and half == 0.0
    mean, half = mean_ci95(torch.tensor([7.0]))
    assert mean == 7.0 and math.isnan(half)


@pytest.mark.parametrize("n", [2, 4, 30])
def test_mean_ci95_is_scipys_t_interval(n):
    values = torch.linspace(-1.0, 2.0, n) ** 2
    mean, half = mean_ci95(values)
    v = values.double().numpy()
    low, high = student_t.interval(0.95, n - 1, loc=v.mean(), scale=sem(v))
    assert mean - half == pytest.approx(low, rel=1e-12) and mean + half == pytest.approx(high, rel=1e-12)


def test_mean_ci95_covers_the_true_mean_at_95_percent_with_four_batches():
    # 4 batches (ELEGANT's GFP evaluation): the normal 1.96 would cover only ~86%
    gen = torch.Generator().manual_seed(0)
    trials = 4000
    hits = 0
    for _ in range(trials):
        m, h = mean_ci95(2.0 + torch.randn(4, generator=gen))
        hits += abs(m - 2.0) <= h
    assert 0.94 <= hits / trials <= 0.96


def test_mean_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert mean_pairwise_distance(x).item() == pytest.approx((5 + 4 + 3) / 3)


# ------------------------------------------------------------------ ratio score


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture1D([0.3, 0.7], [-2.0, 1.5], [0.5, 0.8])


@pytest.fixture(scope="module")
def mixture_data(mixture):
    return mixture.sample(20000, torch.Generator().manual_seed(0)).double()


@pytest.mark.parametrize("process, s", [(OUProcess(), 0.5), (OUProcess(), 1.5), (VPProcess(), 0.1)],
                         ids=["ou-0.5", "ou-1.5", "vp-0.1"])
def test_ratio_score_matches_exact_mixture_score(mixture, mixture_data, process, s):
    alpha, sigma = (t.item() for t in process.marginal_coeffs(torch.tensor(s)))
    noised = mixture.noised(alpha, sigma)
    # a grid over where the noised density has mass (the tails hold too few data samples)
    x = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64).unsqueeze(-1)
    x = x[noised.log_prob(x) > math.log(0.02)]
    assert len(x) > 60
    est = ratio_score(process, x, torch.full((len(x),), s, dtype=torch.float64), mixture_data, delta=1e-12)
    exact = noised.score(x).double()
    assert est.shape == x.shape
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0.05)
    assert (est - exact).abs().mean().item() < 0.03


def test_ratio_score_delta_floor_shrinks_score_far_from_data(mixture, mixture_data):
    process = OUProcess()
    s = 0.5
    alpha, sigma = (t.item() for t in process.marginal_coeffs(torch.tensor(s)))
    near = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    far = torch.tensor([[8.0], [12.0], [-15.0]], dtype=torch.float64)
    t2, t3 = torch.full((2,), s, dtype=torch.float64), torch.full((3,), s, dtype=torch.float64)
    # near the data the density is far above any small floor: the floor changes nothing
    torch.testing.assert_close(ratio_score(process, near, t2, mixture_data, 1e-4),
                               ratio_score(process, near, t2, mixture_data, 1e-30))
    # far away, without an effective floor, it is the (huge) posterior score pulling back to the
    # data: (alpha x0* - x) / sigma^2 for the data point x0* nearest x
    free = ratio_score(process, far, t3, mixture_data, 1e-300)
    nearest = torch.where(far > 0, mixture_data.max(), mixture_data.min())
    torch.testing.assert_close(free, (alpha * nearest - far) / sigma**2, rtol=0.1, atol=0.0)
    assert (free.abs() > 5).all() and torch.equal(torch.sign(free), -torch.sign(far))
    # the floor shrinks it, more for a higher floor, towards zero
    shrunk = ratio_score(process, far, t3, mixture_data, 1e-4)
    shrunk_more = ratio_score(process, far, t3, mixture_data, 1e-2)
    assert (shrunk.abs() < 1e-3 * free.abs()).all()
    assert (shrunk_more.abs() <= shrunk.abs()).all()
    assert torch.equal(torch.sign(shrunk[shrunk != 0]), torch.sign(free[shrunk != 0]))


def test_ratio_score_shrink_factor_is_mean_density_over_floor():
    """Below the floor the estimate is ``E[p] / delta`` times the posterior score."""
    process = OUProcess()
    data = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    x = torch.tensor([[4.0]], dtype=torch.float64)
    s = torch.tensor([0.3], dtype=torch.float64)
    alpha, sigma = (t.item() for t in process.marginal_coeffs(s))
    dens = torch.exp(-0.5 * (alpha * data[:, 0] - 4.0) ** 2 / sigma**2) / math.sqrt(2 * math.pi * sigma**2)
    post = ((dens * (alpha * data[:, 0] - 4.0)).sum() / dens.sum()) / sigma**2
    delta = 10 * dens.mean().item()
    est = ratio_score(process, x, s, data, delta)
    assert est.item() == pytest.approx(post.item() * dens.mean().item() / delta, rel=1e-6)
    assert ratio_score(process, x, s, data, dens.mean().item() / 10).item() == pytest.approx(post.item(), rel=1e-6)


# ------------------------------------------------------------------ data helpers used above


def test_mixture_score_is_derivative_of_log_prob(mixture):
    x = torch.linspace(-4, 4, 9, dtype=torch.float64).unsqueeze(-1)
    h = 1e-5
    fd = (mixture.log_prob(x + h) - mixture.log_prob(x - h)) / (2 * h)
    torch.testing.assert_close(mixture.score(x)[:, 0].double(), fd, rtol=1e-4, atol=1e-4)


def test_mixture_score_works_under_no_grad(mixture):
    x = torch.linspace(-4, 4, 9).unsqueeze(-1)
    with torch.no_grad():
        mixture.score(x)


def test_relaxed_reward_reads_the_undecoded_states():
    """r_hat of the relaxed state and of its softmax; on exact one-hot rows the relaxed value
    is the decoded one, off the vertices it is not."""
    from diffusion_rl.evaluation.evaluate import EvalConfig
    from diffusion_rl.evaluation.metrics import EvalSamples, RelaxedReward

    weights = torch.tensor([[1.0, -1.0, 0.5]])  # a linear "oracle" on [B, L=1, V=3]

    def reward(x):
        return (x * weights).sum((-2, -1))

    cfg = EvalConfig(num_batches=2, batch_size=2)
    onehot = torch.eye(3)[[0, 1, 2, 0]].unsqueeze(1)
    relaxed = onehot * 2.0 - 0.25
    for states, expected in ((onehot, reward(onehot)), (relaxed, reward(relaxed))):
        s = EvalSamples(x=states.argmax(-1), kind="tokens", rewards=reward(onehot), kl_terms={}, cfg=cfg,
                        states=states, reward_fn=reward)
        got = RelaxedReward("reward_relaxed_mean").batch_values(s)
        torch.testing.assert_close(got, expected.reshape(2, 2).mean(1))
    soft = RelaxedReward("reward_softmax_mean", projection="softmax").batch_values(s)
    torch.testing.assert_close(soft, reward(torch.softmax(relaxed, -1)).reshape(2, 2).mean(1))
    assert RelaxedReward("r").needs_states
    with pytest.raises(ValueError, match="projection"):
        RelaxedReward("r", projection="argmax")
