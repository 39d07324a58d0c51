"""diffusers' ``UNet2DModel`` as a backbone for small images (the digits task, METHODS_SPEC §6).

The UNet maps ``(x [B, C, H, W], timestep [B])`` to an output of the process's
``prediction_type`` (``eps`` for the digits preset: ``process=vp_eps``); the process converts
it. Its timestep is ``time_scale * s`` (VP: 1000 maps ``s in [0, 1]`` to the DDPM step range
the UNet's sinusoidal embedding was designed for).

Initial weights: diffusers' layers initialise through ``nn.init`` with no generator; the runner
builds every backbone inside ``seeding.seeded_draws`` (the pretraining seed), which routes
those draws to a generator of its own, so
the weights are a function of that seed alone, as for the other backbones. ``pretrained`` loads
weights written by :meth:`save_pretrained` instead (diffusers' own folder layout, read with
``local_files_only``: nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .base import Backbone

__all__ = ["UNet2DBackbone"]


class UNet2DBackbone(Backbone):
    """Args (the ``UNet2DModel`` arguments of the same names, except the last three):
        sample_size: image side ``H = W``.
        in_channels / out_channels: ``C`` (equal: the output has the state's shape).
        block_out_channels, layers_per_block, down_block_types, up_block_types,
        norm_num_groups, attention_head_dim: the architecture.
        time_scale: the UNet's timestep is ``time_scale * s``.
        pretrained: a folder written by :meth:`save_pretrained` to load (``None``: fresh weights).
    """

    def __init__(self, sample_size: int, in_channels: int = 1, out_channels: int = 1,
                 block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                 down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types: Sequence[str] = ("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups: int = 32, attention_head_dim: int = 8, time_scale: float = 1000.0,
                 pretrained: str | None = None):
        super().__init__()
        from diffusers import UNet2DModel  # here: a config check must not import diffusers

        if in_channels != out_channels:
            raise ValueError(f"backbone.out_channels must equal in_channels (got {out_channels} vs {in_channels})")
        if time_scale <= 0:
            raise ValueError(f"backbone.time_scale must be > 0 (got {time_scale})")
        if pretrained is not None:
            self.unet = UNet2DModel.from_pretrained(str(pretrained), local_files_only=True)
        else:
            self.unet = UNet2DModel(
                sample_size=int(sample_size), in_channels=int(in_channels), out_channels=int(out_channels),
                block_out_channels=tuple(int(c) for c in block_out_channels), layers_per_block=int(layers_per_block),
                down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
                norm_num_groups=int(norm_num_groups), attention_head_dim=int(attention_head_dim))
        config = self.unet.config
        self.event_shape = (int(config.in_channels), int(config.sample_size), int(config.sample_size))
        self.time_scale = float(time_scale)

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"expected x [B, {', '.join(map(str, self.event_shape))}], got {tuple(x.shape)}")
        s = torch.as_tensor(s, device=x.device).reshape(-1).expand(x.shape[0])
        return self.unet(x, self.time_scale * s.to(x.dtype)).sample

    def save_pretrained(self, folder: str | Path) -> None:
        """The UNet in diffusers' folder layout (``config.json`` + weights), for ``pretrained``."""
        self.unet.save_pretrained(str(folder))
