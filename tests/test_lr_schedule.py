"""``method.lr_decay_at``: the rate drops by ``lr_decay_factor`` from that fraction of the
iterations on, for every optimiser of a method, as a function of the iteration alone."""

from __future__ import annotations

import pytest

import gaussian_bed as bed
from diffusion_rl.methods.qlearning import QLearning
from diffusion_rl.methods.reward_backprop import RewardBackprop


def rates(method):
    opts = method.configure_optimizers()
    opts = opts if isinstance(opts, (list, tuple)) else [opts]
    method.optimizers = lambda: opts
    return lambda: [g["lr"] for o in opts for g in o.param_groups]


def test_the_rate_drops_at_the_fraction_and_only_there():
    sam = bed.sampler(5, 1.0)
    m = RewardBackprop(bed.AffineStepScore(sam.times), sam, bed.reward(), iterations=30, batch_size=8, lr=0.1,
                       kl_weight=0.5, lr_decay_at=2 / 3, lr_decay_factor=0.1, grad_window={"kind": "all"})
    lr = rates(m)
    seen = []
    for it in range(30):
        m.apply_lr_schedule(it)
        seen.append(lr()[0])
    assert seen[:20] == [0.1] * 20 and seen[20:] == pytest.approx([0.01] * 10)
    m.apply_lr_schedule(3)  # a resumed run at an earlier iteration gets that iteration's rate back
    assert lr() == [0.1]


def test_every_optimiser_follows_and_null_keeps_the_rate():
    from diffusion_rl.data.toy import GaussianMixture1D
    sam = bed.sampler(5, 1.0)
    kw = dict(iterations=10, batch_size=8, lr=0.1, reward_weight=1.0, temperature=1.0, delta=0.1,
              dataset=GaussianMixture1D([1.0], [0.0], [1.0]), value_lr=0.2)
    q = QLearning(bed.AffineStepScore(sam.times), sam, bed.reward(), lr_decay_at=0.5, **kw)
    lr = rates(q)
    q.apply_lr_schedule(9)
    assert lr() == pytest.approx([0.01, 0.02])
    constant = QLearning(bed.AffineStepScore(sam.times), sam, bed.reward(), **kw)
    lr = rates(constant)
    constant.apply_lr_schedule(9)
    assert lr() == [0.1, 0.2]


def test_a_bad_fraction_is_refused():
    sam = bed.sampler(5, 1.0)
    with pytest.raises(ValueError, match="lr_decay_at"):
        RewardBackprop(bed.AffineStepScore(sam.times), sam, bed.reward(), iterations=3, batch_size=8, lr=0.1,
                       kl_weight=0.5, lr_decay_at=1.5, grad_window={"kind": "all"})
