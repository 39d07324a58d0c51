"""Per-prompt advantage baselines (DDPO's per-prompt stat tracking, ``method.advantage_groups``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import describe, last_error_line, run_cli
from diffusion_rl.methods.group_stats import GroupRewardStats
from diffusion_rl.methods.policy_gradient import PolicyGradientMethod


def ddpo_reference(batches, buffer, min_count):
    """The public tracker's rule, written out on numpy: per prompt a deque of the last
    ``buffer`` rewards (this batch's appended first); fewer than ``min_count``: batch stats."""
    history, out = {}, []
    for prompts, rewards in batches:
        adv = np.empty_like(rewards)
        for p in np.unique(prompts):
            seen = (history.get(p, []) + list(rewards[prompts == p]))[-buffer:]
            history[p] = seen
            if len(seen) < min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(seen), np.std(seen) + 1e-6
            adv[prompts == p] = (rewards[prompts == p] - mean) / std
        out.append(adv)
    return out


def test_the_tracker_follows_the_public_rule_over_several_batches():
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(6):
        prompts = rng.integers(0, 4, size=12)
        batches.append((prompts, rng.normal(size=12) + 3.0 * prompts))  # each prompt its own level
    stats = GroupRewardStats(buffer=8, min_count=5)
    for (prompts, rewards), expected in zip(batches, ddpo_reference(batches, 8, 5)):
        centred, scale = stats.centre_and_scale(torch.tensor(prompts), torch.tensor(rewards, dtype=torch.float64))
        np.testing.assert_allclose((centred / scale).numpy(), expected, rtol=1e-10, atol=1e-10)
    assert all(len(h) <= 8 for h in stats.history.values())
    again = GroupRewardStats(buffer=8, min_count=5)  # a resumed run continues with the same baselines
    again.load_state_dict(stats.state_dict())
    prompts, rewards = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    for a, b in zip(stats.centre_and_scale(prompts, rewards), again.centre_and_scale(prompts, rewards)):
        torch.testing.assert_close(a, b)


def centred(rewards, prompts, groups: bool):
    """``PolicyGradientMethod.centred_rewards`` on a one-process method holding only what it reads."""
    method = SimpleNamespace(group_stats=GroupRewardStats(buffer=64, min_count=1) if groups else None,
                             advantage_groups="prompt", normalize_advantages=True, world_size=lambda: 1)
    traj = SimpleNamespace(cond={"prompt": prompts})
    c, scale = PolicyGradientMethod.centred_rewards(method, rewards, traj)
    return c / scale


def test_a_per_prompt_baseline_compares_images_of_the_same_prompt():
    # prompt 1 scores 10 above prompt 0 whatever the image: the batch baseline hands every
    # prompt-1 chain a positive advantage, the per-prompt one centres each prompt on itself
    g = torch.Generator().manual_seed(0)
    prompts = torch.arange(64) % 2
    rewards = torch.randn(64, generator=g) + 10.0 * prompts
    batch, grouped = centred(rewards, prompts, groups=False), centred(rewards, prompts, groups=True)
    assert (batch[prompts == 1] > 0).all()
    for p in (0, 1):
        assert abs(float(grouped[prompts == p].mean())) < 1e-5
        assert float(grouped[prompts == p].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="group_min_count"):
        GroupRewardStats(buffer=4, min_count=8)
    for method, expected in (("ddpo", "no integer condition 'prompt'"), ("ppo_kl", "baseline is not the reward's")):
        proc = run_cli(["debug=smoke", "dataset=swiss_roll", f"method={method}", "+method.advantage_groups=prompt",
                        f"paths.runs_dir={tmp_path}/runs", f"paths.cache_dir={tmp_path}/cache",
                        f"hydra.run.dir={tmp_path}/{method}"])
        assert proc.returncode != 0, describe(proc)
        assert expected in last_error_line(proc), describe(proc)

