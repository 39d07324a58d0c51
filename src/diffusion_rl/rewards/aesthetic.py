"""The LAION aesthetic score (improved-aesthetic-predictor V2): ELEGANT §8.3's image reward.

pixels in [-1, 1] → [0, 1] → resized to CLIP's input size (bilinear, no antialiasing, as the
image RL code that reproduces the paper does; torchvision is not a dependency) → CLIP's
normalisation → CLIP ViT-L/14 image embedding (its projection, 768-d) → L2 normalisation →
the predictor head of ``<data_dir>/aesthetic/`` (five linear layers and dropouts, no
nonlinearity: an affine map of the unit embedding). Differentiable end to end, so reward
backpropagation reaches the latents through the VAE decoder and CLIP.

The CLIP weights load from a local folder (``paths.clip_model``: a transformers ``CLIPModel``
or ``CLIPVisionModelWithProjection`` folder such as openai/clip-vit-large-patch14), with
``local_files_only``; the head file is checksum-verified and read with ``weights_only``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.checksums import verify_files
from ..local_weights import check_weights_dir, quiet_loading
from .base import Reward

__all__ = ["AestheticHead", "LaionAesthetic"]

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
#: CLIP's image normalisation (the openai preprocessing)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AestheticHead(nn.Module):
    """The predictor's layer layout; its state_dict keys are the file's
    (``layers.{0,2,4,6,7}.{weight,bias}``: indices 1, 3, 5 are the dropouts)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding).squeeze(-1)

    @classmethod
    def from_data_dir(cls, data_dir) -> "AestheticHead":
        folder = Path(data_dir) / "aesthetic"
        verify_files(folder, [HEAD_FILE])
        head = cls()
        head.load_state_dict(torch.load(folder / HEAD_FILE, map_location="cpu", weights_only=True))
        return head.eval().requires_grad_(False)


class LaionAesthetic(Reward):
    """Args:
        weights_dir: the local CLIP ViT-L/14 folder (``paths.clip_model``).
        data_dir: the shared data folder holding ``aesthetic/`` (``paths.data_dir``).
    """

    differentiable = True
    #: CLIP and the head load from their files: checkpoints leave them out
    weights_from_source = True

    def __init__(self, weights_dir, data_dir):
        super().__init__()
        # here: config checks import nothing heavy
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        folder = check_weights_dir(weights_dir, "paths.clip_model", "CLIP ViT-L/14 (a transformers CLIP folder)",
                                   ("config.json",))
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if hasattr(config, "vision_config"):  # a whole CLIPModel: its vision tower and image projection
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            config = vision
        with quiet_loading():
            self.clip = CLIPVisionModelWithProjection.from_pretrained(str(folder), config=config,
                                                                      local_files_only=True).eval()
        self.clip.requires_grad_(False)
        self.head = AestheticHead.from_data_dir(data_dir)
        dim = int(self.clip.config.projection_dim)
        if dim != self.head.layers[0].in_features:
            raise ValueError(f"paths.clip_model={folder}: its image embedding has {dim} dimensions, the aesthetic "
                             f"head reads {self.head.layers[0].in_features} (CLIP ViT-L/14)")
        self.image_size = int(self.clip.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "LaionAesthetic":
        # always evaluation mode: the head's dropouts are not part of the score
        return super().train(False)

    def embed(self, pixels: Tensor) -> Tensor:
        """``[B, 768]`` L2-normalised CLIP image embeddings of images in [-1, 1]."""
        x = (pixels / 2 + 0.5).clamp(0, 1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        embedding = self.clip(pixel_values=x).image_embeds
        return F.normalize(embedding, dim=-1)

    #: image diversity in CLIP space (metrics.PairwiseDistance, space: features)
    features = embed

    def forward(self, x: Tensor, cond=None) -> Tensor:
        return self.head(self.embed(x))
