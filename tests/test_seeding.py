"""Networks start from a generator derived from (seed, role); nothing reads torch's global one.

``seeding.seeded_draws`` routes every random draw of a block (``nn.init`` inside a layer's
constructor, a ``torch.randn`` in ours) to the block's own generator; ``no_global_draws``
makes a draw that still reaches the global generator an error. Tests may seed globally
(library code never does): here it is how "does anything depend on the global state?" is asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_rl.backbones.sequence_transformer import SequenceTransformerBackbone
from diffusion_rl.seeding import derive_seed, no_global_draws, seeded_draws


def build_networks() -> list[nn.Module]:
    # the layer kinds the project's networks are made of: Linear / Conv2d (kaiming + bias),
    # Embedding (normal), attention (xavier, a discarded out-projection draw), our randn
    return [nn.Linear(5, 7), nn.Conv2d(2, 3, 3), nn.Embedding(4, 6),
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
            SequenceTransformerBackbone(length=4, vocab_size=3, d_model=8, nhead=2, num_layers=2, time_dim=8)]


def weights(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def test_weights_depend_on_seed_and_role_only_and_the_global_generator_is_untouched():
    torch.manual_seed(1)
    global_before = torch.random.get_rng_state()
    with seeded_draws(7, "backbone"):
        first = weights(build_networks())
    assert torch.equal(torch.random.get_rng_state(), global_before)  # neither seeded nor read
    torch.manual_seed(2)  # another process history
    with seeded_draws(7, "backbone"):
        again = weights(build_networks())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with seeded_draws(7, "method"):  # another role: another stream
        other = weights(build_networks())
    assert not torch.equal(first[0], other[0])


def test_the_stream_is_that_of_a_generator_seeded_with_the_derived_seed():
    # what keeps every number made when the runner seeded a fork of the global generator:
    # the block's draws are exactly those of torch.manual_seed(derive_seed(seed, role))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(3, "reward"))
        expected = weights(build_networks()) + [torch.randn(5), torch.randperm(9)]
    with seeded_draws(3, "reward"):
        got = weights(build_networks()) + [torch.randn(5), torch.randperm(9)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_an_explicit_generator_is_left_alone():
    mine = torch.Generator().manual_seed(0)
    with seeded_draws(3, "reward"):
        x = torch.randn(4, generator=mine)
    assert torch.equal(x, torch.randn(4, generator=torch.Generator().manual_seed(0)))


def test_a_draw_from_the_global_generator_is_an_error():
    with pytest.raises(RuntimeError, match="'finetune' block drew from torch's global random generator"):
        with no_global_draws("finetune"):
            nn.Linear(3, 3)  # a layer built outside seeded_draws: the negative control of the routing
    with pytest.raises(RuntimeError, match="global random generator"):
        with no_global_draws("pretrain"):
            nn.functional.dropout(torch.ones(100), p=0.5, training=True)  # takes no generator
    with no_global_draws("finetune"):  # draws with their own generator pass
        torch.randn(3, generator=torch.Generator().manual_seed(0))
        nn.functional.dropout(torch.ones(3), p=0.0, training=True)


def test_dropout_that_would_draw_from_the_global_generator_is_refused():
    with pytest.raises(ValueError, match="backbone.dropout must be 0"):
        SequenceTransformerBackbone(length=4, vocab_size=3, d_model=8, nhead=2, num_layers=1, time_dim=8, dropout=0.1)
