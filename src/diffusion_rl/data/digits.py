"""Handwritten digits: sklearn's ``load_digits`` (1,797 8x8 grey images, 16 grey levels), a
real image task small enough for the CPU (METHODS_SPEC §6, "Digits").

The images ship inside scikit-learn, so nothing is downloaded. States are ``[1, 8, 8]``
pixels scaled from 0..16 to ``[-1, 1]`` (the usual DDPM range: the VP prior N(0, I) covers it).
The rows are split once into two disjoint *stratified* halves (each digit's rows are shuffled
by a generator seeded with ``split_seed`` and dealt alternately), one per reward classifier:
the nominal ``r_hat`` is fitted on one half, the genuine ``r`` on the other, so they disagree
as two independently trained models do. The diffusion model is fitted to every row.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Digits"]

#: sklearn's grey levels run 0..16
_MAX_LEVEL = 16.0


class Digits:
    """sklearn digits as ``[N, 1, 8, 8]`` float images in ``[-1, 1]`` with labels ``[N]``.

    Args:
        split_seed: seeds the stratified split into the two halves.
        image_size: 8 (sklearn's); the backbone reads it.
        channels: 1 (grey); the backbone reads it.
    """

    #: what a sample is (validation matches it against a method's ``sample_kinds``)
    sample_kind = "images"
    #: the range of a state's pixels; a decoded sample stays in it (rewards read states and
    #: decoded samples alike), and written images are mapped from it to [0, 1]
    pixel_range = (-1.0, 1.0)

    def __init__(self, split_seed: int = 0, image_size: int = 8, channels: int = 1):
        from sklearn.datasets import load_digits  # here: validation imports nothing heavy

        if (image_size, channels) != (8, 1):
            raise ValueError(f"dataset.image_size must be 8 and dataset.channels 1 for sklearn digits "
                             f"(got {image_size}, {channels})")
        raw = load_digits()
        images = torch.as_tensor(raw.images, dtype=torch.float32)
        lo, hi = self.pixel_range
        self.images = (lo + (hi - lo) * images / _MAX_LEVEL).unsqueeze(1)  # [N, 1, 8, 8]
        self.labels = torch.as_tensor(raw.target, dtype=torch.long)        # [N]
        self.image_size, self.channels = int(image_size), int(channels)
        self.event_shape = (self.channels, self.image_size, self.image_size)
        self.num_classes = int(self.labels.max()) + 1
        self.split_seed = int(split_seed)
        self.halves = self._stratified_halves(torch.Generator().manual_seed(self.split_seed))

    def _stratified_halves(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two disjoint index sets covering every row; per digit, the rows are shuffled and
        dealt alternately, so each half holds half of every class (one more where odd)."""
        first, second = [], []
        for digit in range(self.num_classes):
            rows = (self.labels == digit).nonzero().squeeze(1)
            rows = rows[torch.randperm(len(rows), generator=generator)]
            first.append(rows[0::2])
            second.append(rows[1::2])
        return torch.cat(first).sort().values, torch.cat(second).sort().values

    def half(self, which: int) -> tuple[Tensor, Tensor]:
        """Images ``[n, 1, 8, 8]`` and labels ``[n]`` of half ``which`` (0 or 1)."""
        if which not in (0, 1):
            raise ValueError(f"half must be 0 or 1 (got {which!r})")
        index = self.halves[which]
        return self.images[index], self.labels[index]

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` rows drawn uniformly with replacement from every row, ``[n, 1, 8, 8]``."""
        return self.images[torch.randint(0, len(self.images), (n,), generator=generator)]

    def decode(self, x: Tensor) -> Tensor:
        """A final state clipped to the pixel range: what the rewards and the metrics read (in
        the states' own coordinates, so a reward sees a state and its decoded sample alike)."""
        return x.clamp(*self.pixel_range)
