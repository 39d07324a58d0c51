"""The evaluation's samples on disk, per sample kind: ``samples.npy`` (vectors ``[N, d]``
float32, tokens ``[N, L]`` int64; images: the first ``saved_images`` of ``[N, C, H, W]``
float32 mapped from the data's ``pixel_range`` to [0, 1], plus a ``samples.png`` grid of them)
and ``rewards.npy``, the nominal
reward of each row of ``samples.npy`` (float32)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.image import imsave
from torch import Tensor

__all__ = ["image_grid", "write_samples"]


def image_grid(images: np.ndarray, pad: int = 1) -> np.ndarray:
    """``[N, C, H, W]`` (C = 1 or 3, values in [0, 1]) -> one ``[rows, cols, 3]`` float image:
    ``ceil(sqrt(N))`` tiles a row, ``pad`` white pixels around every tile."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be [N, 1 or 3, H, W] with N >= 1 (got shape {images.shape})")
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = np.broadcast_to(images, (n, 3, h, w)).transpose(0, 2, 3, 1).clip(0.0, 1.0)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i, tile in enumerate(tiles):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top:top + h, left:left + w] = tile
    return grid


def write_samples(run_dir: Path, samples: Tensor, rewards: Tensor, kind: str, saved_images: int,
                  pixel_range: tuple[float, float] = (0.0, 1.0)) -> None:
    """Write ``samples.npy`` and ``rewards.npy`` (and for images ``samples.png``) into ``run_dir``;
    images in ``pixel_range`` (the data set's: digits are in [-1, 1]) are written in [0, 1]."""
    x, r = samples.detach().cpu().numpy(), rewards.detach().cpu().numpy()
    if kind == "images":
        # a bounded number: N full-resolution images would not fit on disk
        lo, hi = pixel_range
        x, r = ((x[:saved_images] - lo) / (hi - lo)).astype(np.float32), r[:saved_images]
        imsave(run_dir / "samples.png", image_grid(x))
    else:
        x = x.astype(np.int64 if kind == "tokens" else np.float32)
    np.save(run_dir / "samples.npy", x)
    np.save(run_dir / "rewards.npy", r.astype(np.float32))
