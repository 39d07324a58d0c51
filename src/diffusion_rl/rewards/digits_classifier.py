"""A small CNN classifier of the digits as a reward: ``log p(digit | x)`` (METHODS_SPEC §6).

The nominal ``r_hat`` and the genuine ``r`` are the same network fitted on the two disjoint
stratified halves of the data (:class:`diffusion_rl.data.digits.Digits`): two classifiers
that agree on real digits and may disagree off them, which is where reward over-optimisation
shows. Each is fitted once and cached (``<cache_dir>/oracle/<key>/``) with its accuracy on
the other half; the target digit is not part of the key (one fit serves every digit).

The reward reads states in the data's pixel coordinates (``[-1, 1]``) and is differentiable
in them, so reward backpropagation reaches the pixels; :meth:`ClassifierReward.features` (the
penultimate layer) is what the feature-space diversity metric measures distances in.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..cache import cached_network
from ..seeding import derive_seed
from .base import Reward

__all__ = ["DigitCNN", "ClassifierReward", "trained_digit_classifier"]

log = logging.getLogger(__name__)


class DigitCNN(nn.Module):
    """``x [B, C, H, W] -> logits [B, num_classes]``: 3x3 convolutions (each after the first
    halving the resolution), SiLU, then a ``feature_dim`` penultimate layer and a linear head.

    Args:
        image_size, channels: the input's side and channels.
        widths: output channels of the convolutions.
        feature_dim: width of the penultimate layer (:meth:`features`).
        num_classes: number of digits.
    """

    def __init__(self, image_size: int = 8, channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                 feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        if not widths or any(int(w) <= 0 for w in widths) or feature_dim <= 0 or num_classes < 2:
            raise ValueError("classifier widths and feature_dim must be positive, num_classes >= 2")
        layers: list[nn.Module] = []
        width, side = int(channels), int(image_size)
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2  # keep full resolution for the first layer's strokes
            layers += [nn.Conv2d(width, int(w), 3, stride=stride, padding=1), nn.SiLU()]
            width, side = int(w), math.ceil(side / stride)
        self.conv = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, int(feature_dim)), nn.SiLU())
        self.head = nn.Linear(int(feature_dim), int(num_classes))

    def features(self, x: Tensor) -> Tensor:
        """``[B, feature_dim]`` penultimate activations."""
        return self.embed(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ClassifierReward(Reward):
    """``log softmax(net(x))[digit]``: frozen, in eval mode, differentiable in ``x``."""

    differentiable = True

    def __init__(self, net: nn.Module, digit: int):
        super().__init__()
        self.net = net.eval()
        self.net.requires_grad_(False)
        self.digit = int(digit)

    def train(self, mode: bool = True) -> "ClassifierReward":
        super().train(mode)
        self.net.eval()  # a frozen classifier never switches to training behaviour
        return self

    def forward(self, x: Tensor, cond=None) -> Tensor:
        return torch.log_softmax(self.net(x), dim=-1)[:, self.digit]

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(x)


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Share of ``images`` whose argmax class is their label."""
    return float((net(images).argmax(-1) == labels).float().mean())


def trained_digit_classifier(dataset, net: nn.Module, *, cache_dir: str | Path, half: int, digit: int,
                             epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0,
                             seed: int = 0) -> ClassifierReward:
    """Fit ``net`` by cross-entropy with Adam on half ``half`` of ``dataset`` (``Digits``), or load
    it from the cache; its accuracy on the other half goes to ``classifier.json`` there and to
    the reward's ``summary`` (``heldout_accuracy``, copied into every run's metrics.json).

    The mini-batch order comes from a generator seeded with ``seed``; the initial weights from
    the runner's seeded block around the network's construction.
    """
    if half not in (0, 1):
        raise ValueError(f"reward.half must be 0 or 1 (got {half!r})")
    if not 0 <= digit < dataset.num_classes:
        raise ValueError(f"reward.digit must be in [0, {dataset.num_classes}) (got {digit})")
    if epochs <= 0 or batch_size <= 0 or lr <= 0 or weight_decay < 0:
        raise ValueError("reward.epochs > 0, batch_size > 0, lr > 0 and weight_decay >= 0 required")
    images, labels = dataset.half(half)
    heldout_images, heldout_labels = dataset.half(1 - half)
    # what defines the fitted network: the data, its split, the network and the fit (not the digit)
    settings = dict(data="sklearn_digits", rows=len(dataset), split_seed=dataset.split_seed, half=half,
                    pixel_range=list(dataset.pixel_range), net=repr(net), epochs=epochs, batch_size=batch_size,
                    lr=lr, weight_decay=weight_decay, seed=seed)

    def fit(folder: Path) -> dict:
        generator = torch.Generator().manual_seed(derive_seed(seed, "classifier_batches"))
        optimiser = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        net.train()
        for _ in range(epochs):
            for rows in torch.randperm(len(labels), generator=generator).split(batch_size):
                loss = nn.functional.cross_entropy(net(images[rows]), labels[rows])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        net.zero_grad(set_to_none=True)  # a fresh fit and a cache hit give the same frozen net
        net.eval()
        return {"heldout_accuracy": accuracy(net, heldout_images, heldout_labels),
                "train_accuracy": accuracy(net, images, labels), "final_loss": float(loss.detach()), **settings}

    folder, summary = cached_network("oracle", settings, cache_dir, net, fit, "classifier")
    reward = ClassifierReward(net, digit)
    reward.summary = summary
    log.info("digit classifier %s (half %d): held-out accuracy %.4f", folder, half, summary["heldout_accuracy"])
    return reward
