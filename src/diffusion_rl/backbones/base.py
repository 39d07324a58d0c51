"""Backbones: the only place where methods meet a network.

A backbone maps ``(x [B, *E], s [B], cond)`` to the output its process expects (a score for
score-parametrised processes, a drift for the Brownian bridge). Methods never look inside:
they ask for ``trainable_parameters()`` and a ``frozen_reference()`` that computes the
pretrained output. A Stable Diffusion backbone implements the same three things with a
UNet + LoRA adapters (reference = adapters disabled), latents as ``x``, text embeddings as
``cond`` and classifier-free guidance inside ``forward``; ``decode`` maps latents to pixels.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

from torch import Tensor, nn

from ..core.conditioning import ConditionSource, Unconditional


class Backbone(nn.Module):
    #: shape of one sample, e.g. (2,) for the Swiss roll, (L, V) for one-hot sequences
    event_shape: tuple[int, ...]
    #: whether a method may deep-copy it (ELEGANT's initial control starts from a copy); not a
    #: billion-parameter UNet
    copyable: bool = True

    def forward(self, x: Tensor, s: Tensor, cond: Any = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What fine-tuning updates (all weights here; LoRA weights for SD)."""
        return (p for p in self.parameters() if p.requires_grad)

    def frozen_reference(self) -> "Backbone":
        """A copy computing the pretrained output, receiving no gradient."""
        ref = copy.deepcopy(self).eval()
        ref.requires_grad_(False)
        return ref

    def decode(self, x: Tensor) -> Tensor:
        """Final state → the sample the evaluation reports (identity for vectors; tokens for
        sequences)."""
        return x

    def render(self, x: Tensor) -> Tensor:
        """Final state → the reward's input, differentiably (what reward gradients flow
        through): the state itself here (a relaxed one-hot sequence, pixels); a latent
        diffusion model's decoder."""
        return x

    def condition_source(self) -> ConditionSource:
        """Where chains get the conditioning this backbone reads (a text-to-image backbone's
        prompts); none for the unconditional tasks."""
        return Unconditional()
