"""The path-KL gradient of every KL-regularised method against the exact one, in the
linear-Gaussian bed (tests/gaussian_bed.py): ``E[sum_k KL_k]`` is a closed-form function of
the policy's coefficients, so its gradient is exact; each method's update is run once with
SGD and its gradient compared within a Monte-Carlo tolerance (4 standard errors over
independent batches). Negative controls: the biased estimators the audit found (reference
evaluated under no_grad; KL only in the return-to-go) and DPOK's fixed-state gradient,
which is a different (myopic) quantity by design."""

from __future__ import annotations

import pytest
import torch

import gaussian_bed as bed
from diffusion_rl.methods.dpok import DPOK
from diffusion_rl.methods.ppo_kl import PPOKL
from diffusion_rl.methods.reward_backprop import RewardBackprop

K, T, BATCH, REPEATS = 5, 1.0, 4096, 12


def exact_path_kl_gradient(sam, backbone) -> torch.Tensor:
    chain = bed.pretrained_chain(sam)
    backbone.zero_grad(set_to_none=True)
    chain.path_kl(*bed.policy_means(sam, backbone)).backward()
    return torch.cat([p.grad.flatten() for p in backbone.trainable_parameters()])


def sampled_gradients(cls, seed=0, **kw) -> torch.Tensor:
    """``[REPEATS, P]`` gradients of ``kl_weight * path KL`` (reward weight 0) from one update each."""
    sam = bed.sampler(K, T)
    method = cls(bed.perturbed_backbone(sam), sam, bed.reward(), iterations=1, batch_size=BATCH, lr=1.0,
                 seed=seed, reward_weight=0.0, kl_weight=1.0, **kw)
    method.reference = bed.AffineStepScore(sam.times).requires_grad_(False)  # the exact pretrained score
    return torch.stack([bed.sgd_update(method) for _ in range(REPEATS)]), exact_path_kl_gradient(sam, method.backbone)


def assert_unbiased(grads, exact):
    mean, se = grads.mean(0), grads.std(0) / REPEATS**0.5
    assert exact.abs().max() > 0.1  # the perturbed policy is far enough from the reference to test anything
    assert ((mean - exact).abs() <= 4 * se + 1e-3).all(), f"\nsampled {mean}\nexact   {exact}\nse      {se}"


def assert_biased(grads, exact, factor=10):
    mean, se = grads.mean(0), grads.std(0) / REPEATS**0.5
    assert ((mean - exact).abs() > factor * se).any(), f"\nsampled {mean}\nexact   {exact}\nse      {se}"


def test_reward_backprop_differentiates_the_reference_through_the_state():
    assert_unbiased(*sampled_gradients(RewardBackprop, grad_window={"kind": "all"}))


def test_reward_backprop_with_a_no_grad_reference_is_biased(monkeypatch):
    """Negative control: the audit's bug (reference output under no_grad inside the window)."""
    sam = bed.sampler(K, T)

    grads, exact = sampled_gradients(RewardBackprop, grad_window={"kind": "all"})
    method = RewardBackprop(bed.perturbed_backbone(sam), sam, bed.reward(), iterations=1, batch_size=BATCH, lr=1.0,
                            reward_weight=0.0, kl_weight=1.0, grad_window={"kind": "all"})
    method.reference = bed.DetachedReference(sam.times)
    biased = torch.stack([bed.sgd_update(method) for _ in range(REPEATS)])
    assert_biased(biased, exact)


@pytest.mark.parametrize("kl_penalty", ["analytic", "log_ratio"])
def test_ppo_kl_gradient_is_the_path_kl_gradient(kl_penalty):
    assert_unbiased(*sampled_gradients(PPOKL, kl_penalty=kl_penalty, minibatches=1, normalize_advantages=False))


def test_ppo_kl_normalised_advantages_only_rescale_the_gradient():
    grads, exact = sampled_gradients(PPOKL, minibatches=1, normalize_advantages=True)
    cosine = torch.nn.functional.cosine_similarity(grads.mean(0), exact, dim=0)
    assert cosine > 0.99, cosine


def test_ppo_kl_with_the_kl_only_in_the_return_to_go_is_biased(monkeypatch):
    """Negative control: the first version (closed-form KL of steps j >= k in the advantages,
    nothing differentiated) estimates only the through-the-states part, and a wrong one."""

    def old_advantages(self, rewards, traj):
        kl_to_go = traj.kl.detach().flip(0).cumsum(0).flip(0)
        returns = self.reward_weight * rewards.unsqueeze(0) - self.kl_weight * kl_to_go
        return returns - returns.mean(1, keepdim=True)

    monkeypatch.setattr(PPOKL, "advantages", old_advantages)
    monkeypatch.setattr(PPOKL, "regulariser", lambda self, traj, means, steps, idx: means.new_zeros(()))
    assert_biased(*sampled_gradients(PPOKL, minibatches=1, normalize_advantages=False))


def test_dpok_gradient_holds_the_states_fixed():
    """DPOK differentiates each step's KL at the visited states: its gradient is the exact
    direct part only, not the path-KL gradient (hence its myopic optimum)."""
    grads, exact = sampled_gradients(DPOK, minibatches=1)
    assert_biased(grads, exact)
    sam = bed.sampler(K, T)
    backbone = bed.perturbed_backbone(sam)
    chain = bed.pretrained_chain(sam)
    # the direct part: the path KL with the state moments held at the current policy's values
    slopes, intercepts = bed.policy_means(sam, backbone)
    mean, var = chain._moments(slopes.detach(), intercepts.detach())
    direct = ((((slopes - chain.A) * mean[:-1] + intercepts - chain.c) ** 2 + (slopes - chain.A) ** 2 * var[:-1])
              / (2 * chain.var)).sum()
    direct.backward()
    exact_direct = torch.cat([backbone.a.grad, backbone.b.grad])
    mean_g, se = grads.mean(0), grads.std(0) / REPEATS**0.5
    assert ((mean_g - exact_direct).abs() <= 4 * se + 1e-3).all(), f"\n{mean_g}\n{exact_direct}\n{se}"
