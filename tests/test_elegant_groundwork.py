"""ELEGANT groundwork on TFBind8: transformer backbone, oracles, diversity, exact tilted optimum."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion_rl.backbones.sequence_transformer import SequenceTransformerBackbone
from diffusion_rl.data.sequences import SequenceData, one_hot
from diffusion_rl.evaluation.diversity import mean_pairwise_levenshtein, tokens_to_strings
from diffusion_rl.evaluation.exact_optimum import (
    all_sequences,
    empirical_log_p_data,
    tilted_distribution,
)
from diffusion_rl.rewards.oracles import ExactLookupReward, MLPOracle, OracleRegression, OracleReward

torch.set_num_threads(1)


def shared_data_dir() -> Path:
    """``$DIFFUSION_RL_SHARED_DATA`` if set, else ``shared/data`` next to the repo root."""
    env = os.environ.get("DIFFUSION_RL_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def levenshtein_reference(a: str, b: str) -> int:
    """Textbook dynamic programme (the test's independent reference)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ---------------------------------------------------------------- backbone


def test_transformer_backbone_shapes_reference_and_decode() -> None:
    torch.manual_seed(0)
    net = SequenceTransformerBackbone(length=8, vocab_size=4, d_model=32, nhead=4, num_layers=2)
    assert net.event_shape == (8, 4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, 4, generator=gen)
    s = torch.rand(5, generator=gen)
    out = net(x, s)
    assert out.shape == (5, 8, 4) and torch.isfinite(out).all()
    assert net(x, torch.tensor(0.3)).shape == (5, 8, 4)  # scalar time broadcasts
    # time and position both matter
    assert not torch.allclose(net(x, s), net(x, s + 0.5))
    assert not torch.allclose(out[:, 0], net(x.roll(1, dims=1), s)[:, 1])

    ref = net.frozen_reference()
    assert all(not p.requires_grad for p in ref.parameters())
    # the frozen copy is in eval mode, where PyTorch may take the fused encoder fast path
    assert torch.allclose(ref(x, s), out, atol=1e-5)
    x_req = x.clone().requires_grad_(True)
    (net(x_req, s).square().sum() + ref(x_req, s).square().sum()).backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.trainable_parameters())
    assert x_req.grad is not None

    tokens = net.decode(x)
    assert tokens.dtype == torch.long and tokens.shape == (5, 8)
    assert torch.equal(tokens, x.argmax(-1))


# ---------------------------------------------------------------- oracles


def test_oracle_regression_fits_additive_function() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    length, vocab = 6, 4
    tokens = torch.randint(0, vocab, (600, length), generator=gen)
    w = torch.rand(length, vocab, generator=gen)
    y = one_hot(tokens, vocab).mul(w).sum((-1, -2)) / length  # sum of one-hot features, in (0, 1)
    net = MLPOracle(length, vocab, hidden=(32, 32))
    module = OracleRegression(net, tokens, y, vocab, batch_size=30, lr=3e-3, seed=0)
    assert len(module.train_index) == len(module.heldout_index) == 300
    assert set(module.train_index.tolist()).isdisjoint(module.heldout_index.tolist())
    # seeded split, independent of the global RNG
    torch.manual_seed(123)
    again = OracleRegression(MLPOracle(length, vocab, hidden=(4,)), tokens, y, vocab, seed=0)
    assert torch.equal(again.train_index, module.train_index)
    trainer = L.Trainer(max_epochs=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", check_val_every_n_epoch=25)
    trainer.fit(module)
    r2 = float(trainer.callback_metrics["oracle/heldout_r2"])
    assert "oracle/train_mse_step" in trainer.callback_metrics or "oracle/train_mse" in trainer.callback_metrics
    assert r2 > 0.9, r2
    assert abs(module.heldout_r2() - r2) < 1e-4


def test_oracle_reward_relaxed_and_hard_paths() -> None:
    torch.manual_seed(0)
    net = MLPOracle(8, 4, hidden=(16, 16, 16))
    reward = OracleReward(net, vocab_size=4)
    assert reward.differentiable
    assert all(not p.requires_grad for p in reward.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 8, 4, generator=gen, requires_grad=True)
    r = reward(x)
    assert r.shape == (7,) and ((r > 0) & (r < 1)).all()
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    tokens = x.detach().argmax(-1)
    assert torch.allclose(reward(tokens), reward.hard(x.detach()))
    assert torch.allclose(reward(tokens), net(one_hot(tokens, 4)))
    reward.train()
    assert not reward.net.training


def test_exact_lookup_reward_matches_table() -> None:
    folder = shared_data_dir() / "tfbind8"
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent")
    from diffusion_rl.data.tfbind8 import TFBind8ExactLookup, load_tfbind8

    data = load_tfbind8(folder)
    reward = ExactLookupReward(data)
    assert not reward.differentiable
    rows = torch.tensor([0, 1, 17, 4096, 65_000, 65_791])
    tokens = data.tokens[rows]
    assert torch.equal(reward(tokens), data.y[rows])
    relaxed = one_hot(tokens, 4) + 0.3 * torch.rand(len(rows), 8, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reward(relaxed), data.y[rows])
    assert torch.equal(ExactLookupReward(TFBind8ExactLookup(data))(tokens), data.y[rows])


# ---------------------------------------------------------------- diversity


def test_mean_pairwise_levenshtein_matches_double_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (20, 8), generator=gen)
    tokens[3] = tokens[7]  # a duplicate pair (distance 0)
    strings = tokens_to_strings(tokens)
    assert strings[0] == "".join("ABCD"[t] for t in tokens[0].tolist())
    n = len(strings)
    ref = sum(levenshtein_reference(strings[i], strings[j]) for i in range(n) for j in range(n) if i != j)
    ref /= n * (n - 1)
    assert mean_pairwise_levenshtein(tokens) == pytest.approx(ref, abs=1e-12)
    assert mean_pairwise_levenshtein(tokens, chunk_size=3) == pytest.approx(ref, abs=1e-12)
    words = ["kitten", "sitting", "sit", "", "kit"]
    ref_words = sum(levenshtein_reference(a, b) for a, b in itertools.permutations(words, 2)) / 20
    assert mean_pairwise_levenshtein(words) == pytest.approx(ref_words)
    with pytest.raises(ValueError):
        mean_pairwise_levenshtein(tokens[:1])


# ---------------------------------------------------------------- exact optimum


def _tiny_space():
    """V=2, L=3: all 8 sequences with a random reward and a random p_data (float64)."""
    tokens = all_sequences(3, 2)
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(8, generator=gen, dtype=torch.float64)
    p_data = torch.rand(8, generator=gen, dtype=torch.float64) + 0.1
    p_data /= p_data.sum()
    return tokens, r, p_data


def test_all_sequences_enumeration() -> None:
    tokens = all_sequences(3, 2)
    assert tokens.shape == (8, 3)
    assert tokens.tolist() == [list(t) for t in itertools.product(range(2), repeat=3)]


def test_tilted_distribution_brute_force_and_limits() -> None:
    tokens, r, p_data = _tiny_space()
    for alpha in (0.05, 0.3, 2.0):
        w = [math.exp(r[i].item() / alpha) * p_data[i].item() for i in range(8)]
        ref = torch.tensor([wi / sum(w) for wi in w], dtype=torch.float64)
        p = tilted_distribution(p_data.log(), r, alpha)
        assert p.dtype == torch.float64
        assert torch.allclose(p, ref, rtol=1e-12, atol=1e-15)
    assert torch.allclose(tilted_distribution(p_data.log(), r, 1e6), p_data, atol=1e-6)
    assert torch.allclose(tilted_distribution(p_data.log(), r, math.inf), p_data)
    best = int(r.argmax())
    assert tilted_distribution(p_data.log(), r, 1e-3)[best] > 0.99
    p0 = tilted_distribution(p_data.log(), r, 0.0)
    assert p0[best] == 1.0 and p0.sum() == 1.0
    # alpha = 0 with a tie: mass split in proportion to p_data; off-support maximisers ignored
    r_tie = r.clone()
    r_tie[0] = r_tie[1] = r.max() + 1
    r_tie[2] = r.max() + 5
    log_p = p_data.log()
    log_p[2] = -math.inf
    p_tie = tilted_distribution(log_p, r_tie, 0.0)
    assert torch.allclose(p_tie[[0, 1]], p_data[[0, 1]] / p_data[[0, 1]].sum())
    # large rewards / tiny alpha stay finite in log space
    assert torch.isfinite(tilted_distribution(p_data.log(), 1e4 * r, 1e-4)).all()
    with pytest.raises(ValueError):
        tilted_distribution(p_data.log(), r, -1.0)


def test_empirical_log_p_data_smoothing() -> None:
    all_tokens = all_sequences(3, 2)
    train = all_tokens[[1, 1, 5, 6]]  # sequence 1 twice
    log_p = empirical_log_p_data(train, all_tokens, smoothing=0.5)
    expected = torch.full((8,), 0.5, dtype=torch.float64)
    expected[1] += 2
    expected[5] += 1
    expected[6] += 1
    expected /= 4 + 0.5 * 8
    assert log_p.dtype == torch.float64
    assert torch.allclose(log_p.exp(), expected)
    # permuted enumeration: aligned with the rows given
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(empirical_log_p_data(train, all_tokens[perm], 0.5), log_p[perm])
    hard = empirical_log_p_data(train, all_tokens, smoothing=0.0)
    assert hard[0] == -math.inf and hard[1].exp().item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        empirical_log_p_data(torch.tensor([[1, 1, 1]]), all_tokens[:4], 0.1)  # not in the space
    with pytest.raises(ValueError):
        empirical_log_p_data(train, torch.cat([all_tokens, all_tokens[:1]]), 0.1)  # duplicate row


def test_trained_oracle_is_cached_and_normalises_labels(tmp_path) -> None:
    """trained_oracle fits once (the second call loads the cache: same weights, no new folder),
    and normalize_y fits min-max-scaled labels over the task's whole table."""
    from types import SimpleNamespace

    from diffusion_rl.rewards.oracles import MLPOracle, trained_oracle

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (600, 4), generator=g)
    y = 10.0 + 5.0 * (tokens == 2).float().sum(1)  # additive, in [10, 30]
    full = SequenceData(tokens=tokens, y=y, alphabet="ABC", name="toy")
    task = SimpleNamespace(train=full.subset(torch.arange(300), name="toy_train"), full=full, vocab_size=3,
                           state_offset=None)

    def fit():
        torch.manual_seed(0)  # the network's initial weights (loading the cache overwrites them)
        return trained_oracle(task, MLPOracle(4, 3, hidden=(32,)), cache_dir=tmp_path, rows="full",
                              normalize_y=True, epochs=30, batch_size=64, lr=1e-2)

    first = fit()
    assert len(list((tmp_path / "oracle").iterdir())) == 1
    second = fit()
    assert len(list((tmp_path / "oracle").iterdir())) == 1
    for a, b in zip(first.net.parameters(), second.net.parameters()):
        assert torch.equal(a, b)
    assert first.summary["heldout_r2"] > 0.9 and first.summary["normalize_y"] is True
    pred = first(tokens)
    assert 0 <= pred.min() and pred.max() <= 1  # sigmoid output on the normalised scale
    target = (y - y.min()) / (y.max() - y.min())
    assert (pred - target).abs().mean() < 0.1


def test_exact_optimum_tilts_the_pretrained_chains_decoded_law():
    """``p_data: pretrained`` tilts what the pretrained chain generates (like for like with a
    fine-tuned chain's KL), estimated from its own draws: at a huge alpha the tilt is that
    empirical law, which is not the training split's."""
    from diffusion_rl.backbones.sequence_transformer import SequenceTransformerBackbone
    from diffusion_rl.core.processes import VPProcess
    from diffusion_rl.core.samplers import EulerMaruyama
    from diffusion_rl.data.sequence_tasks import TFBind8Task
    from diffusion_rl.evaluation.exact_optimum import all_sequences, empirical_log_p_data
    from diffusion_rl.methods.exact_optimum import ExactOptimum
    from diffusion_rl.rewards.oracles import ExactLookupReward

    task = TFBind8Task(shared_data_dir() / "tfbind8")
    torch.manual_seed(0)
    backbone = SequenceTransformerBackbone(8, 4, d_model=16, nhead=2, num_layers=1, time_scale=1000.0)
    sampler = EulerMaruyama(VPProcess(time_scale=1000.0), 4)
    kw = dict(dataset=task, kl_weight=1e6, smoothing=1e-3, iterations=0, batch_size=8, lr=1e-3, seed=3)
    method = ExactOptimum(backbone, sampler, ExactLookupReward(task.full), p_data="pretrained", pretrained_samples=3000, **kw)
    draws = method._pretrained_draws(3000)
    expected = empirical_log_p_data(draws, all_sequences(8, 4), smoothing=1e-3).exp()
    assert torch.allclose(method.probs.double(), expected, atol=1e-7)
    on_train = ExactOptimum(backbone, sampler, ExactLookupReward(task.full), p_data="train", **kw)
    assert (method.probs - on_train.probs).abs().sum() > 0.5  # a different law from the training split's
