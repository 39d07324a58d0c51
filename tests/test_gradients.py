"""Gradients reach exactly the intended parameters: one fine-tuning iteration moves the
backbone (and the q-learning critic), never the frozen pretrained reference."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from diffusion_rl.backbones.mlp import MLPBackbone
from diffusion_rl.core.processes import OUProcess
from diffusion_rl.core.samplers import EulerMaruyama, ODEEuler
from diffusion_rl.data.toy import SwissRoll
from diffusion_rl.methods.ddpo import DDPO
from diffusion_rl.methods.dpok import DPOK
from diffusion_rl.methods.elegant import ELEGANT
from diffusion_rl.methods.guidance import Guidance
from diffusion_rl.methods.ppo_kl import PPOKL
from diffusion_rl.methods.qlearning import QLearning
from diffusion_rl.methods.reward_backprop import RewardBackprop
from diffusion_rl.rewards.base import BoxIndicator, QuadraticTarget

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec")

COMMON = dict(iterations=1, batch_size=8, lr=1e-2, seed=0, iterations_per_epoch=1)


def build(cls, reward=None, **kw):
    torch.manual_seed(0)
    backbone = MLPBackbone(2, hidden=16)
    sampler = EulerMaruyama(OUProcess(T=1.0), 4)
    # the box covers about half of where the chains end, so rewards (and advantages) vary;
    # a method that backpropagates the reward gets a differentiable one
    reward = reward or (QuadraticTarget([1.0, 1.0]) if cls.needs_differentiable_reward
                        else BoxIndicator([-100.0, 0.0], [100.0, 100.0]))
    return cls(backbone, sampler, reward, dataset=SwissRoll(noise=1.0, scale=0.1), **{**COMMON, **kw})


def build_qlearning(**kw):
    return build(QLearning, **{"reward_weight": 1.0, "temperature": 0.1, "delta": 1e-4, "data_samples": 32, **kw})


def fit_one_iteration(method, tmp_path):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(method)
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, prefix: str) -> list[str]:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return [k for k in keys if not torch.equal(before[k], after[k])]


METHODS = {
    "ddpo": lambda: build(DDPO, minibatches=2),
    "dpok": lambda: build(DPOK, minibatches=2, kl_weight=1.0, reward_weight=5.0),
    "qlearning": build_qlearning,
    "qlearning_mc": lambda: build_qlearning(critic_target="monte_carlo"),
    "qlearning_learned_entropy": lambda: build_qlearning(critic_entropy="learned"),
    "ppo_kl": lambda: build(PPOKL, minibatches=2, kl_weight=0.1),
    "reward_backprop": lambda: build(RewardBackprop, kl_weight=1.0, grad_window={"kind": "all"}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_one_update_moves_trainable_weights_only(name, tmp_path):
    method = METHODS[name]()
    assert all(not p.requires_grad for p in method.reference.parameters())
    assert all(p.requires_grad for p in method.backbone.parameters())
    # the reference starts as an exact copy of the backbone
    ref0 = snapshot(method.reference)
    assert all(torch.equal(ref0[k], v) for k, v in snapshot(method.backbone).items())
    before = snapshot(method)

    fit_one_iteration(method, tmp_path)
    after = snapshot(method)

    assert changed(before, after, "backbone.") == [k for k in before if k.startswith("backbone.")], \
        "every backbone tensor should move"
    assert changed(before, after, "reference.") == []
    assert all(p.grad is None for p in method.reference.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())
    assert all(not p.requires_grad for p in method.reference.parameters())
    if name.startswith("qlearning"):
        assert changed(before, after, "value.") == [k for k in before if k.startswith("value.")]
        assert all(p.grad is not None for p in method.value.parameters())
        assert len(method.trainer.optimizers) == 2
    else:
        assert len(method.trainer.optimizers) == 1
        # the optimiser holds the backbone only
        opt_params = {id(p) for g in method.trainer.optimizers[0].param_groups for p in g["params"]}
        assert opt_params == {id(p) for p in method.backbone.parameters()}


def test_dpok_without_reward_stays_at_the_reference(tmp_path):
    """reward_weight = 0 and a backbone equal to the reference: zero advantages and a KL at its
    minimum, so the gradient (hence Adam's step) is exactly zero."""
    method = build(DPOK, minibatches=2, kl_weight=1.0, reward_weight=0.0)
    before = snapshot(method)
    fit_one_iteration(method, tmp_path)
    after = snapshot(method)
    assert changed(before, after, "backbone.") == []
    for p in method.backbone.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_dpok_kl_term_pulls_back_to_the_reference(tmp_path):
    """With only the KL term and a perturbed backbone, one step reduces the distance to the reference."""
    method = build(DPOK, minibatches=1, kl_weight=1.0, reward_weight=0.0, lr=1e-3)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def distance():
        return sum(((p - q) ** 2).sum().item()
                   for p, q in zip(method.backbone.parameters(), method.reference.parameters()))

    d0 = distance()
    fit_one_iteration(method, tmp_path)
    assert distance() < d0


def test_ddpo_advantages_are_normalised():
    method = build(DDPO)
    rewards = torch.tensor([0.0, 1.0, 1.0, 3.0])
    adv = method.advantages(rewards, None)
    assert adv.mean().abs().item() < 1e-6
    assert adv.std().item() == pytest.approx(1.0, rel=1e-5)
    dpok = build(DPOK, reward_weight=2.0)
    torch.testing.assert_close(dpok.advantages(rewards, None), 2.0 * (rewards - rewards.mean()))  # unnormalised


@pytest.mark.parametrize("cls, kw, key", [
    (DDPO, dict(clip_range=0.0), "clip_range"),
    (DPOK, dict(kl_weight=-1.0), "kl_weight"),
    (QLearning, dict(reward_weight=1.0, temperature=0.0, delta=1e-4), "temperature"),
    (QLearning, dict(reward_weight=-1.0, temperature=0.1, delta=1e-4), "reward_weight"),
    (QLearning, dict(reward_weight=1.0, temperature=0.1, delta=1e-4, critic_target="td0"), "critic_target"),
    (QLearning, dict(reward_weight=1.0, temperature=0.1, delta=1e-4, critic_entropy="none"), "critic_entropy"),
    (QLearning, dict(reward_weight=1.0, temperature=0.1, delta=1e-4, eval_actions="samples"), "eval_actions"),
    (DDPO, dict(batch_size=0), "batch_size"),
    (DDPO, dict(lr=0.0), "lr"),
])
def test_method_constructors_check_ranges(cls, kw, key):
    with pytest.raises(ValueError, match=key):
        build(cls, **kw)


def test_ddpo_runs_with_a_stochastic_ddim_sampler(tmp_path):
    from diffusion_rl.core.samplers import DDIM

    torch.manual_seed(0)
    method = DDPO(MLPBackbone(2, hidden=16), DDIM(OUProcess(T=1.0), 4, eta=1.0),
                  BoxIndicator([-100.0, 0.0], [100.0, 100.0]), dataset=SwissRoll(), minibatches=2, **COMMON)
    assert method.sampler.stochastic
    before = snapshot(method)
    fit_one_iteration(method, tmp_path)
    assert changed(before, snapshot(method), "backbone.")


def test_methods_reject_what_their_flags_rule_out():
    box = BoxIndicator([-100.0, 0.0], [100.0, 100.0])
    for cls in (RewardBackprop, ELEGANT):
        with pytest.raises(ValueError, match="differentiable"):
            build(cls, reward=box, **({"kl_weight": 0.5} if cls is ELEGANT else {}))
    for cls in (DDPO, DPOK, PPOKL):
        with pytest.raises(ValueError, match="stochastic"):
            cls(MLPBackbone(2, hidden=16), ODEEuler(OUProcess(T=1.0), 4), box, **COMMON)


def test_ppo_kl_advantages_are_the_later_steps_kl_to_go():
    """Analytic penalty: step k's return is r - kl_weight * (KL_{k+1} + ... + KL_{K-1}), centred
    over the batch per step (KL_k itself is differentiated directly, tests/test_kl_gradient.py)."""
    from types import SimpleNamespace

    method = build(PPOKL, kl_weight=1.0, normalize_advantages=False)
    traj = SimpleNamespace(kl=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # [K=2, B=2]
    adv = method.advantages(torch.tensor([0.0, 0.0]), traj)
    # later-steps KL: [[3, 4], [0, 0]], returns its negative, centred per step
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    adv = build(PPOKL, kl_weight=0.0, normalize_advantages=False).advantages(torch.tensor([1.0, 3.0]), traj)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]))  # DDPO's, at every step


def test_elegant_stages_train_their_own_networks_only(tmp_path):
    """Stage 1 moves the value net, stage 2 the initial-distribution control, stage 3 the
    backbone; the pretrained reference never moves and never gets a gradient."""
    method = build(ELEGANT, kl_weight=0.5, iterations=3, value_fraction=0.2,
                   initial_fraction=0.2, initial_steps=3)
    assert method.phase_ends == (1, 2, 3)
    prefixes = ("backbone.", "value_net.", "initial_control.", "reference.")
    expected = {"value": "value_net.", "initial": "initial_control.", "drift": "backbone."}
    for stage in ("value", "initial", "drift"):
        assert method.phase == stage
        before = snapshot(method)
        fit_one_iteration(method, tmp_path)
        after = snapshot(method)
        moved = {p for p in prefixes if changed(before, after, p)}
        assert moved == {expected[stage]}, (stage, moved)
        assert all(p.grad is None for p in method.reference.parameters())
    assert int(method.iteration) == 3


def test_elegant_initial_chain_starts_at_the_stationary_reference():
    """Before stage 2 the control's gain is 0: the initial chain is the N(0, I)-preserving SDE,
    its path KL is 0 and its samples keep unit variance."""
    method = build(ELEGANT, kl_weight=0.5, iterations=10, initial_steps=20)
    traj = method.initial_rollout(4000, torch.Generator().manual_seed(0))
    assert traj.path_kl().abs().max().item() == 0.0
    var = traj.final.var(0)
    prior_var = method.initial_sampler.process.std ** 2
    assert torch.allclose(var, torch.full_like(var, prior_var), rtol=0.08)


def test_guidance_trains_the_classifier_only(tmp_path):
    method = build(Guidance, guidance_scale=1.0, top_fraction=0.5, label_pool=256)
    before = snapshot(method)
    fit_one_iteration(method, tmp_path)
    after = snapshot(method)
    assert changed(before, after, "backbone.") == [] and changed(before, after, "reference.") == []
    assert changed(before, after, "classifier.")
    assert all(p.grad is None for p in method.backbone.parameters())


@pytest.mark.parametrize("cls, kw", [(DDPO, {}), (DPOK, dict(kl_weight=1.0, reward_weight=2.0)), (PPOKL, dict(kl_weight=0.5))])
@pytest.mark.parametrize("chunk", [1, 3])
def test_step_chunked_backward_gives_the_one_backward_update(cls, kw, chunk, tmp_path):
    """The policy-gradient objective is a sum over steps: backpropagating it a few steps at a
    time (the memory-bounded path) must give the same update as one backward, and still move
    the backbone only."""
    whole = build(cls, minibatches=2, **kw)
    chunked = build(cls, minibatches=2, steps_per_backward=chunk, **kw)
    before = snapshot(chunked)
    fit_one_iteration(whole, tmp_path / "whole")
    fit_one_iteration(chunked, tmp_path / "chunked")
    moved = changed(before, snapshot(chunked), "backbone.")
    assert moved and not changed(before, snapshot(chunked), "reference.")
    for (name, a), b in zip(whole.backbone.state_dict().items(), chunked.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
