"""Samplers: per-step Gaussian KL against closed forms, convergence to the data distribution
with the exact score, the gradient window, checkpointing, recomputation and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_rl.backbones.mlp import MLPBackbone
from diffusion_rl.core.processes import OUProcess, VPProcess
from diffusion_rl.core.samplers import DDIM, EulerMaruyama, GradWindow, ODEEuler
from diffusion_rl.core.trajectory import gaussian_log_prob
from diffusion_rl.data.toy import GaussianMixture1D


def linear_policy(a: float, b: float):
    def policy(x, s, cond=None):
        return a * x + b
    return policy


def em_mean(process, x, s, dt, out):
    """Euler–Maruyama mean written out for the OU process: x + (theta x + g^2 out) dt."""
    return x + (process.theta * x + process.sigma**2 * out) * dt


# ------------------------------------------------------------------ (a) KL to the reference


@pytest.mark.usefixtures("float64")
def test_em_step_kl_matches_gaussian_formula():
    process = OUProcess(T=2.0, theta=1.0, sigma=math.sqrt(2.0))
    sampler = EulerMaruyama(process, num_steps=5)
    gen = torch.Generator().manual_seed(0)
    x_init = torch.randn(7, 2, generator=gen)
    policy, reference = linear_policy(-0.8, 0.3), linear_policy(-1.0, 0.0)
    traj = sampler.rollout(policy, x_init=x_init, reference=reference, generator=gen)

    assert traj.kl.shape == (5, 7)
    dt = 2.0 / 5
    std = process.sigma * math.sqrt(dt)
    for k in range(5):
        x = traj.states[k]
        s = traj.times[k]
        m1 = em_mean(process, x, s, dt, -0.8 * x + 0.3)
        m2 = em_mean(process, x, s, dt, -1.0 * x)
        torch.testing.assert_close(traj.means[k], m1)
        torch.testing.assert_close(traj.stds[k], torch.tensor(std))
        # recorded next state = mean + std * recorded noise
        torch.testing.assert_close(traj.states[k + 1], m1 + std * traj.noises[k])
        expected = ((m1 - m2) ** 2).sum(-1) / (2 * std**2)
        torch.testing.assert_close(traj.kl[k], expected)
        assert (traj.kl[k] > 0).all()
    torch.testing.assert_close(traj.path_kl(), traj.kl.sum(0))


@pytest.mark.usefixtures("float64")
def test_one_step_kl_equals_closed_form_between_two_gaussians():
    process = OUProcess(T=1.0)
    sampler = EulerMaruyama(process, num_steps=1)
    x_init = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-1.5, 1.5]])
    policy, reference = linear_policy(0.4, -0.2), linear_policy(-0.3, 0.6)
    traj = sampler.rollout(policy, x_init=x_init, reference=reference, generator=torch.Generator().manual_seed(1))
    std = process.sigma * math.sqrt(1.0)
    m1 = em_mean(process, x_init, 1.0, 1.0, 0.4 * x_init - 0.2)
    m2 = em_mean(process, x_init, 1.0, 1.0, -0.3 * x_init + 0.6)
    p = torch.distributions.Independent(torch.distributions.Normal(m1, std), 1)
    q = torch.distributions.Independent(torch.distributions.Normal(m2, std), 1)
    torch.testing.assert_close(traj.kl[0], torch.distributions.kl_divergence(p, q))
    # the same policy as reference: zero KL
    same = sampler.rollout(policy, x_init=x_init, reference=policy, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(same.kl, torch.zeros(1, 3))


@pytest.mark.usefixtures("float64")
def test_deterministic_step_kl_is_girsanov_cost():
    process = OUProcess(T=1.0)
    sampler = ODEEuler(process, num_steps=4)
    x_init = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    traj = sampler.rollout(linear_policy(0.4, -0.2), x_init=x_init, reference=linear_policy(0.0, 0.0))
    assert torch.all(traj.stds == 0)
    for k in range(4):
        out = 0.4 * traj.states[k] - 0.2
        expected = 0.5 * process.sigma**2 * 0.25 * (out**2).sum(-1)
        torch.testing.assert_close(traj.kl[k], expected)


def test_log_probs_are_gaussian_log_densities():
    process = OUProcess(T=1.0)
    sampler = EulerMaruyama(process, num_steps=3)
    traj = sampler.rollout(linear_policy(-1.0, 0.1), 4, event_shape=(2,), generator=torch.Generator().manual_seed(0))
    logp = traj.log_probs()
    normal = torch.distributions.Normal(traj.means, traj.stds.reshape(-1, 1, 1))
    torch.testing.assert_close(logp, normal.log_prob(traj.states[1:]).sum(-1))


# ------------------------------------------------------------------ (b) exact-score sampling


DATA_MEAN, DATA_VAR = 1.5, 0.25


def exact_score_policy(process, data):
    def policy(x, s, cond=None):
        alpha, sigma = process.marginal_coeffs(s[0])
        with torch.enable_grad():  # rollouts outside the gradient window run under no_grad
            return data.noised(alpha.item(), sigma.item()).score(x).to(x.dtype)
    return policy


def exact_flow_map(process, x_T):
    """The probability-flow ODE of Gaussian data is affine: it maps x_T to m + sqrt(v) z."""
    alpha, sigma = process.marginal_coeffs(torch.tensor(process.T))
    alpha, sigma = alpha.item(), sigma.item()
    return DATA_MEAN + (x_T - alpha * DATA_MEAN) * math.sqrt(DATA_VAR) / math.sqrt(alpha**2 * DATA_VAR + sigma**2)


@pytest.fixture(scope="module")
def gaussian_data():
    return GaussianMixture1D([1.0], [DATA_MEAN], [math.sqrt(DATA_VAR)])


@pytest.mark.parametrize("make_sampler", [lambda p: DDIM(p, 500, eta=0.0), lambda p: ODEEuler(p, 500)],
                         ids=["ddim", "ode_euler"])
def test_deterministic_samplers_with_exact_score_reach_the_data(gaussian_data, make_sampler):
    process = OUProcess(T=5.0)
    sampler = make_sampler(process)
    gen = torch.Generator().manual_seed(0)
    traj = sampler.rollout(exact_score_policy(process, gaussian_data), 2000, event_shape=(1,), generator=gen)
    x = traj.final.double()
    assert abs(x.mean().item() - DATA_MEAN) < 0.05
    assert abs(x.var().item() - DATA_VAR) < 0.03


def test_ode_euler_with_exact_score_follows_the_exact_flow_map(gaussian_data):
    process = OUProcess(T=5.0)
    traj = ODEEuler(process, 500).rollout(exact_score_policy(process, gaussian_data), 2000, event_shape=(1,),
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(traj.final.double(), exact_flow_map(process, traj.states[0].double()),
                               rtol=0, atol=0.05)


@pytest.mark.parametrize("num_steps", [5, 50])
def test_ddim_with_exact_gaussian_score_is_the_closed_form_affine_map(gaussian_data, num_steps):
    """With the exact score of N(m, v), one DDIM(eta=0) step from s to s' maps
    ``x - a m`` to ``(x - a m) (a a' v + sig sig') / (a^2 v + sig^2)``: the whole chain is an
    affine map whose slope is the product of these factors (< 1: DDIM contracts on a coarse grid)."""
    process = OUProcess(T=5.0)
    sampler = DDIM(process, num_steps, eta=0.0)
    traj = sampler.rollout(exact_score_policy(process, gaussian_data), 64, event_shape=(1,),
                           generator=torch.Generator().manual_seed(3))
    a, sig = (t.double() for t in process.marginal_coeffs(sampler.times.double()))
    m, v = DATA_MEAN, DATA_VAR
    y = traj.states[0].double() - a[0] * m
    for k in range(num_steps):
        y = y * (a[k] * a[k + 1] * v + sig[k] * sig[k + 1]) / (a[k] ** 2 * v + sig[k] ** 2)
        torch.testing.assert_close(traj.states[k + 1].double(), a[k + 1] * m + y, rtol=1e-4, atol=1e-4)


def test_euler_maruyama_with_exact_score_reaches_the_data(gaussian_data):
    process = OUProcess(T=5.0)
    sampler = EulerMaruyama(process, 500)
    traj = sampler.rollout(exact_score_policy(process, gaussian_data), 4000, event_shape=(1,),
                           generator=torch.Generator().manual_seed(1))
    x = traj.final.double()
    assert (traj.stds > 0).all()
    assert abs(x.mean().item() - DATA_MEAN) < 0.06
    assert abs(x.var().item() - DATA_VAR) < 0.05


def test_ddim_eta1_with_exact_gaussian_score_matches_its_closed_form(gaussian_data):
    """DDIM(eta=1) with the exact score of N(m, v): ``y = x - a m`` evolves as
    ``y' = c y + std noise`` with ``c = (a a' v + sqrt(sig'^2 - std^2) sig) / (a^2 v + sig^2)``,
    so each recorded step and the final variance are known in closed form. (On the OU grid
    the last step is coarse in noise level, so even 200 steps land well below v.)"""
    process = OUProcess(T=5.0)
    sampler = DDIM(process, 200, eta=1.0)
    traj = sampler.rollout(exact_score_policy(process, gaussian_data), 4000, event_shape=(1,),
                           generator=torch.Generator().manual_seed(1))
    assert sampler.stochastic and (traj.stds[:-1] > 0).all()
    assert traj.stds[-1] == 0  # sig(t_min = 0) = 0: the last DDPM step is deterministic
    a, sig = (t.double() for t in process.marginal_coeffs(sampler.times.double()))
    m, v = DATA_MEAN, DATA_VAR
    var_pred = sig[0] ** 2  # prior draw: y_0 = x_T - a_T m has variance sig_T^2
    for k in range(sampler.num_steps):
        post_var = sig[k + 1] ** 2 * (sig[k] ** 2 - (a[k] / a[k + 1]) ** 2 * sig[k + 1] ** 2) / sig[k] ** 2
        std = post_var.clamp_min(0).sqrt()
        c = (a[k] * a[k + 1] * v + (sig[k + 1] ** 2 - std**2).clamp_min(0).sqrt() * sig[k]) / (a[k] ** 2 * v + sig[k] ** 2)
        assert traj.stds[k].item() == pytest.approx(std.item(), rel=1e-4, abs=1e-6)
        y_next = c * (traj.states[k].double() - a[k] * m) + traj.stds[k].double() * traj.noises[k].double()
        torch.testing.assert_close(traj.states[k + 1].double(), a[k + 1] * m + y_next, rtol=1e-4, atol=1e-4)
        var_pred = c**2 * var_pred + std**2
    x = traj.final.double()
    assert abs(x.mean().item() - m) < 5 * math.sqrt(var_pred / 4000) + 0.01
    assert x.var().item() == pytest.approx(var_pred.item(), rel=0.1)


def test_ddim_on_vp_with_exact_score_reaches_the_data(gaussian_data):
    process = VPProcess()
    sampler = DDIM(process, 200, eta=0.0)
    traj = sampler.rollout(exact_score_policy(process, gaussian_data), 2000, event_shape=(1,),
                           generator=torch.Generator().manual_seed(2))
    x = traj.final.double()
    assert abs(x.mean().item() - DATA_MEAN) < 0.05
    assert abs(x.var().item() - DATA_VAR) < 0.03


# ------------------------------------------------------------------ (c) gradient window


K = 6


class RecordingPolicy:
    """Wraps a backbone and keeps each step's output (with ``retain_grad``) to see which
    steps took part in the graph and received gradient."""

    def __init__(self, backbone):
        self.backbone, self.outputs = backbone, []

    def __call__(self, x, s, cond=None):
        out = self.backbone(x, s, cond)
        if out.requires_grad:
            out.retain_grad()
        self.outputs.append(out)
        return out


def make_backbone(seed=0):
    torch.manual_seed(seed)
    return MLPBackbone(dim=2, hidden=16)


def manual_truncated_grads(sampler, backbone, traj, start):
    """Parameter gradients of ``final.sum()`` recomputed by hand from ``states[start]``
    (detached) with the recorded noises: what the window should backpropagate through."""
    backbone.zero_grad(set_to_none=True)
    x = traj.states[start].detach()
    B = x.shape[0]
    for k in range(start, sampler.num_steps):
        kk = torch.full((B,), k, dtype=torch.long)
        out = backbone(x, sampler.times[kk])
        mean, std = sampler.transition(x, kk, out)
        x = mean + std[:, None] * traj.noises[k]
    x.sum().backward()
    return [p.grad.clone() for p in backbone.parameters()]


@pytest.mark.parametrize("window, expected_start", [
    (GradWindow("all"), 0), (GradWindow("last_k", 2), K - 2), (GradWindow("last_k", 100), 0),
])
def test_grad_window_reaches_exactly_the_window_steps(window, expected_start):
    backbone = make_backbone()
    sampler = EulerMaruyama(OUProcess(T=1.0), K)
    policy = RecordingPolicy(backbone)
    traj = sampler.rollout(policy, 5, event_shape=(2,), generator=torch.Generator().manual_seed(0),
                           grad_window=window)
    assert traj.grad_start == expected_start
    traj.final.sum().backward()
    for k, out in enumerate(policy.outputs):
        if k < expected_start:
            assert not out.requires_grad, k
        else:
            assert out.requires_grad and out.grad is not None and out.grad.abs().sum() > 0, k
    assert traj.final.grad_fn is not None
    got = [p.grad.clone() for p in backbone.parameters()]
    want = manual_truncated_grads(sampler, backbone, traj, expected_start)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_grad_window_none_gives_no_graph():
    backbone = make_backbone()
    sampler = EulerMaruyama(OUProcess(T=1.0), K)
    policy = RecordingPolicy(backbone)
    traj = sampler.rollout(policy, 5, event_shape=(2,), generator=torch.Generator().manual_seed(0),
                           grad_window=GradWindow("none"))
    assert traj.grad_start == K
    assert traj.final.grad_fn is None and not traj.final.requires_grad
    assert not any(out.requires_grad for out in policy.outputs)
    assert not traj.means.requires_grad


def test_grad_window_random_k():
    sampler = EulerMaruyama(OUProcess(T=1.0), K)
    window = GradWindow("random_k", 3)
    starts = set()
    for seed in range(30):
        backbone = make_backbone()
        policy = RecordingPolicy(backbone)
        traj = sampler.rollout(policy, 3, event_shape=(2,), generator=torch.Generator().manual_seed(seed),
                               grad_window=window)
        assert K - 3 <= traj.grad_start <= K - 1
        starts.add(traj.grad_start)
        if seed < 3:
            traj.final.sum().backward()
            grads = [out.grad is not None for out in policy.outputs]
            assert grads == [k >= traj.grad_start for k in range(K)]
    assert len(starts) > 1  # varies with the generator
    # same generator seed, same window
    a = sampler.rollout(make_backbone(), 3, event_shape=(2,), generator=torch.Generator().manual_seed(7),
                        grad_window=window)
    b = sampler.rollout(make_backbone(), 3, event_shape=(2,), generator=torch.Generator().manual_seed(7),
                        grad_window=window)
    assert a.grad_start == b.grad_start


def test_grad_window_rejects_bad_kinds():
    with pytest.raises(ValueError):
        GradWindow("sometimes")
    with pytest.raises(ValueError):
        GradWindow("last_k", 0)


# ------------------------------------------------------------------ (d) checkpointing


@pytest.mark.parametrize("window", [GradWindow("all"), GradWindow("last_k", 3)])
def test_checkpointed_steps_give_the_same_gradients(window):
    sampler = EulerMaruyama(OUProcess(T=1.0), K)
    grads = []
    for ckpt in (False, True):
        backbone = make_backbone(3)
        traj = sampler.rollout(backbone, 5, event_shape=(2,), generator=torch.Generator().manual_seed(4),
                               grad_window=window, checkpoint_steps=ckpt, reference=make_backbone(4))
        ((traj.final**2).sum() + traj.path_kl().sum()).backward()
        grads.append([p.grad.clone() for p in backbone.parameters()])
    for g0, g1 in zip(*grads):
        assert g0.abs().sum() > 0
        torch.testing.assert_close(g0, g1)


# ------------------------------------------------------------------ (e) recomputation


@pytest.mark.parametrize("make_sampler", [lambda p: EulerMaruyama(p, 5), lambda p: DDIM(p, 5, eta=0.5),
                                          lambda p: ODEEuler(p, 5)], ids=["em", "ddim", "ode"])
def test_recompute_means_reproduces_rollout(make_sampler):
    backbone = make_backbone(5)
    sampler = make_sampler(OUProcess(T=2.0))
    with torch.no_grad():
        traj = sampler.rollout(backbone, 4, event_shape=(2,), generator=torch.Generator().manual_seed(0))
        means = sampler.recompute_means(backbone, traj)
    assert means.shape == traj.means.shape == (5, 4, 2)
    torch.testing.assert_close(means, traj.means, rtol=1e-5, atol=1e-6)
    # and under a different policy it differs
    with torch.no_grad():
        other = sampler.recompute_means(make_backbone(6), traj)
    assert not torch.allclose(other, traj.means)


def test_recompute_means_with_mapping_conditioning_in_chunks_and_per_chain():
    """Conditioning is a mapping of per-chain tensors: recomputation (in one call or in chunks
    of steps) and chain selection index every entry with its chain."""
    def policy(x, s, cond):
        return -x * cond["scale"][:, None] + cond["shift"]
    sampler = EulerMaruyama(OUProcess(T=1.0), 5)
    cond = {"shift": torch.tensor([[1.0, 0.0], [0.0, -2.0], [3.0, 3.0]]), "scale": torch.tensor([1.0, 2.0, 0.5])}
    traj = sampler.rollout(policy, 3, event_shape=(2,), cond=cond, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampler.recompute_means(policy, traj), traj.means)
    torch.testing.assert_close(sampler.recompute_means(policy, traj, chunk_steps=2), traj.means)
    torch.testing.assert_close(sampler.recompute_means(policy, traj, steps=range(1, 4)), traj.means[1:4])
    idx = torch.tensor([2, 0])
    sub = traj.select(idx)
    torch.testing.assert_close(sampler.recompute_means(policy, sub), traj.means[:, idx])
    torch.testing.assert_close(sub.log_probs(), traj.log_probs()[:, idx])
    with pytest.raises(ValueError, match="one per chain"):
        sampler.rollout(policy, 2, event_shape=(2,), cond=cond)


# ------------------------------------------------------------------ (f) input checks


@pytest.mark.parametrize("cls", [EulerMaruyama, ODEEuler, DDIM])
@pytest.mark.parametrize("steps", [0, -3])
def test_nonpositive_num_steps_raises(cls, steps):
    with pytest.raises(ValueError, match="num_steps"):
        cls(OUProcess(), steps)


def test_negative_eta_raises():
    with pytest.raises(ValueError, match="eta"):
        DDIM(OUProcess(), 4, eta=-0.1)


@pytest.mark.parametrize("make_sampler", [lambda p: ODEEuler(p, 3), lambda p: DDIM(p, 3, eta=0.0)],
                         ids=["ode", "ddim0"])
def test_log_probs_on_deterministic_sampler_raises(make_sampler):
    sampler = make_sampler(OUProcess(T=1.0))
    assert not sampler.stochastic
    traj = sampler.rollout(linear_policy(-1.0, 0.0), 2, event_shape=(2,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        traj.log_probs()


def test_gaussian_log_prob_zero_std_steps():
    """A deterministic step (std 0, DDIM's last) has log-probability 0, also in a chunk of
    steps that holds only such steps (the trajectory-level check is log_probs')."""
    x, mean = torch.randn(2, 3, 1), torch.zeros(2, 3, 1)
    logp = gaussian_log_prob(x, mean, torch.tensor([1.0, 0.0]))
    assert torch.equal(logp[1], torch.zeros(3))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x[0, :, 0])
    torch.testing.assert_close(logp[0], expected)
    assert torch.equal(gaussian_log_prob(x, mean, torch.tensor([0.0, 0.0])), torch.zeros(2, 3))


def test_path_kl_without_reference_raises():
    traj = EulerMaruyama(OUProcess(T=1.0), 2).rollout(linear_policy(-1.0, 0.0), 2, event_shape=(1,))
    assert traj.kl is None
    with pytest.raises(ValueError):
        traj.path_kl()


def test_final_noise_off_returns_the_last_mean():
    """final_noise=False: the last state is the last transition's mean (no noise), that step adds
    no log-probability, and its KL to a reference is the Girsanov control cost."""
    from diffusion_rl.core.processes import VPProcess
    from diffusion_rl.core.samplers import EulerMaruyama

    process = VPProcess()
    policy = lambda x, s, cond=None: -x  # noqa: E731  (the N(0, I) score)
    reference = lambda x, s, cond=None: -0.5 * x  # noqa: E731
    on = EulerMaruyama(process, 5)
    off = EulerMaruyama(process, 5, final_noise=False)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = on.rollout(policy, 64, generator=g(), event_shape=(3,), reference=reference)
    b = off.rollout(policy, 64, generator=g(), event_shape=(3,), reference=reference)
    torch.testing.assert_close(a.states[:-1], b.states[:-1])  # identical until the last step
    torch.testing.assert_close(b.final, b.means[-1])
    assert not torch.allclose(a.final, a.means[-1])
    assert b.stds[-1] == 0 and (b.stds[:-1] > 0).all()
    assert (b.log_probs()[-1] == 0).all() and (b.log_probs()[:-1] != 0).all()
    s, dt = off._grid(b.states[-2], torch.full((64,), 4))
    cost = 0.5 * process.g(s) ** 2 * dt * ((b.outputs[-1] - reference(b.states[-2], s)) ** 2).sum(-1)
    torch.testing.assert_close(b.kl[-1], cost)
    torch.testing.assert_close(b.kl[:-1], a.kl[:-1])
