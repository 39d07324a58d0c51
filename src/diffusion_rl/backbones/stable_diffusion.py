"""Stable Diffusion (1.5) as a backbone: latents as ``x``, prompts as ``cond``, LoRA as what trains.

Loaded from a local folder in diffusers' layout (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``: what ``StableDiffusionPipeline.save_pretrained`` writes), with
``local_files_only``: nothing is downloaded, and a missing folder is refused by the config
check before anything runs (``weights_dir``, set from ``paths.sd_model``).

* ``forward(x, s, cond)``: the UNet's ε-prediction at timestep ``time_scale * s`` under
  classifier-free guidance, ``ε_u + w (ε_c − ε_u)``, the unconditional branch reading the
  empty prompt. The process converts ε (``process=discrete_vp``: SD's schedule). The
  reference chain is guided the same way: both chains are "the CFG sampler", one with LoRA.
* Prompts: every training and evaluation prompt is encoded once by the frozen CLIP text
  encoder at construction, into a table the chains index (``cond = {"prompt": [B] rows}``,
  :class:`~diffusion_rl.core.conditioning.PromptSource`); the text encoder is then dropped.
* What trains: LoRA adapters on the UNet's attention projections (peft, through diffusers'
  ``add_adapter``); the base UNet, the VAE and the text table are frozen.
  :meth:`frozen_reference` is the same UNet with the adapters disabled — no second UNet.
* :meth:`decode`: the VAE decoder, ``latents / scaling_factor`` to pixels in [-1, 1],
  checkpointed when it carries a gradient (its activations are the largest single holder of
  memory at 512 px, METHODS_SPEC §6).
* Checkpoints keep only the LoRA weights (``weights_from_source``: the method leaves out, and
  restores from this folder, every weight that fine-tuning does not change).

LoRA's initial weights (peft draws them through ``nn.init``) come from the run's seed: the runner
builds the backbone in ``seeding.seeded_draws``, which routes those draws to a generator of its
own: lora_B starts at zero, so the fine-tuned chain starts equal to
the reference whatever the draw.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..core.conditioning import PromptSource
from ..local_weights import check_weights_dir, quiet_loading
from .base import Backbone

__all__ = ["StableDiffusionBackbone", "AdaptersDisabled"]

#: the four attention projections LoRA adapts in the public image RL code (METHODS_SPEC §3.2)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class StableDiffusionBackbone(Backbone):
    """Args:
        weights_dir: the diffusers-format folder (``paths.sd_model``).
        train_prompts / eval_prompts: the prompts the chains index (the data set's lists).
        guidance_scale: the CFG weight ``w`` (1: no unconditional pass).
        lora_rank / lora_alpha: the adapters' rank and scale (``alpha / rank`` multiplies
            their output; ``lora_alpha: null`` = the rank, peft's usual choice of scale 1).
        lora_targets: the module names the adapters wrap.
        time_scale: the UNet's timestep is ``time_scale * s`` (1 with ``process=discrete_vp``).
        checkpoint_decode: recompute the VAE decoder in backward instead of keeping its
            activations (only where the decode carries a gradient).
        negative_prompt: what the unconditional branch reads ("" in SD and the papers).
    """

    #: every weight but the LoRA adapters reloads from ``weights_dir``: checkpoints leave them out
    weights_from_source = True
    copyable = False

    def __init__(self, weights_dir, train_prompts: Sequence[str], eval_prompts: Sequence[str],
                 guidance_scale: float = 7.5, lora_rank: int = 4, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS, time_scale: float = 1.0,
                 checkpoint_decode: bool = True, negative_prompt: str = ""):
        super().__init__()
        # here, not at module level: a config check must not import diffusers / transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = check_weights_dir(weights_dir, "paths.sd_model", "Stable Diffusion in diffusers' layout",
                                   ("unet", "vae", "text_encoder", "tokenizer"))
        if guidance_scale < 1:
            raise ValueError(f"backbone.guidance_scale must be >= 1 (got {guidance_scale})")
        if lora_rank < 1:
            raise ValueError(f"backbone.lora_rank must be >= 1 (got {lora_rank})")
        load = dict(local_files_only=True)
        self.unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **load)
        self.vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **load)
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=int(lora_rank), lora_alpha=float(lora_alpha or lora_rank),
                                         init_lora_weights="gaussian", target_modules=list(lora_targets)))
        self.guidance_scale, self.time_scale = float(guidance_scale), float(time_scale)
        self.checkpoint_decode = bool(checkpoint_decode)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        size = self.unet.config.sample_size
        self.event_shape = (int(self.unet.config.in_channels), int(size), int(size))

        with quiet_loading():
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", **load)
            text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", **load).eval()
        self.num_train, self.num_eval = len(train_prompts), len(eval_prompts)
        with torch.no_grad():
            table = self._encode(tokenizer, text_encoder, [*train_prompts, *eval_prompts, negative_prompt])
        # not in state_dict: a function of the weights folder and the prompts (the config)
        self.register_buffer("prompt_embeds", table[:-1], persistent=False)
        self.register_buffer("negative_embeds", table[-1:], persistent=False)

    @staticmethod
    def _encode(tokenizer, text_encoder, prompts: list[str]) -> Tensor:
        """``[P, L, D]`` CLIP text hidden states, prompts padded to the tokenizer's length (77)."""
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    # --- the backbone contract -------------------------------------------------------------
    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        if cond is None or "prompt" not in cond:
            raise ValueError("the Stable Diffusion backbone needs cond = {'prompt': rows} (its condition_source())")
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"expected latents [B, {', '.join(map(str, self.event_shape))}], got {tuple(x.shape)}")
        batch = x.shape[0]
        t = (self.time_scale * torch.as_tensor(s, device=x.device).reshape(-1).expand(batch)).to(x.dtype)
        text = self.prompt_embeds[cond["prompt"].to(self.prompt_embeds.device)].to(x.dtype)
        if self.guidance_scale == 1:
            return self.unet(x, t, encoder_hidden_states=text).sample
        # the two branches in one UNet call, as diffusers' pipelines do
        both = torch.cat([self.negative_embeds.to(x.dtype).expand(batch, -1, -1), text])
        eps_u, eps_c = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=both).sample.chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def trainable_parameters(self):
        return (p for name, p in self.named_parameters() if "lora_" in name)

    def frozen_reference(self) -> "AdaptersDisabled":
        return AdaptersDisabled(self)

    def decode(self, x: Tensor) -> Tensor:
        def vae_decode(z: Tensor) -> Tensor:
            return self.vae.decode(z / self.scaling_factor).sample.clamp(-1, 1)

        if self.checkpoint_decode and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(vae_decode, x, use_reentrant=False)
        return vae_decode(x)

    render = decode  # rewards read pixels, and their gradients flow through the decoder

    def condition_source(self) -> PromptSource:
        return PromptSource(self.num_train, self.num_eval)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base UNet inside the block. peft's toggle also sets the adapters' requires_grad
        (off, then on again): what it restores is exactly the trainable state."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()


class AdaptersDisabled(Backbone):
    """The pretrained chain of a :class:`StableDiffusionBackbone`: its UNet with the LoRA
    adapters off. It holds the backbone outside the module tree (not a submodule), so the
    method's state_dict, ``.to(device)`` and DDP see one UNet, not two."""

    def __init__(self, backbone: StableDiffusionBackbone):
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)
        self.event_shape = backbone.event_shape

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        # the toggle is inside forward, so a checkpointed step recomputes the reference with
        # the adapters off too, whatever their state when backward runs
        with self._backbone.adapters_disabled():
            return self._backbone(x, s, cond)

    def trainable_parameters(self):
        return iter(())

    def frozen_reference(self) -> "AdaptersDisabled":
        return self

    def decode(self, x: Tensor) -> Tensor:
        return self._backbone.decode(x)

    def render(self, x: Tensor) -> Tensor:
        return self._backbone.render(x)

    def condition_source(self) -> PromptSource:
        return self._backbone.condition_source()
