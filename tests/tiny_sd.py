"""Tiny Stable Diffusion and CLIP folders, built in memory and written with ``save_pretrained``
(as diffusers' own tests do), so tests load them through the real loading path.

A tiny UNet2DConditionModel (8x8 latents, channels 8/16, cross-attention 16), a tiny
AutoencoderKL (one downsampling: 16x16 RGB), a tiny CLIP text tower with a character-level
CLIP tokenizer written as vocab.json + merges.txt, and a tiny CLIP vision tower whose projection
is 768-d so that the real LAION aesthetic head fits on top. Weights are random (seeded).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

LATENT_SIZE = 8
CROSS_DIM = 16


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer without merges: every printable character is a token (its
    end-of-word form too), which is all a tiny text tower needs."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))


def write_tiny_sd(folder: Path, seed: int = 0, latent_size: int = LATENT_SIZE, channels: tuple[int, int] = (8, 16),
                  layers_per_block: int = 1, cross_dim: int = CROSS_DIM) -> Path:
    """A diffusers-layout Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/);
    the sizes default to the tests' (the benchmark's tiny chain is larger)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    write_tokenizer(folder / "tokenizer")
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    torch.manual_seed(seed)  # test code: the tiny weights are a function of the seed
    UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(channels), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim, attention_head_dim=4,
        norm_num_groups=8,
    ).save_pretrained(str(folder / "unet"))
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=2 * latent_size,
    ).save_pretrained(str(folder / "vae"))
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cross_dim, intermediate_size=2 * cross_dim, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(str(folder / "text_encoder"))
    return folder


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A transformers ``CLIPModel`` folder (as openai/clip-vit-large-patch14 is) with a tiny
    vision tower and a 768-d projection."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=768)
    CLIPModel(config).save_pretrained(str(folder))
    return Path(folder)
