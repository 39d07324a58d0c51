"""Synthetic 1-D / 2-D data of the q-learning paper (§6.2, §6.3)."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import make_swiss_roll
from torch import Tensor


class ToyData:
    """A distribution we can draw from on demand: ``sample(n, generator) -> [n, d]``."""

    dim: int
    #: what a sample is (validation matches it against a method's ``sample_kinds``)
    sample_kind = "vectors"

    def _check_dim(self, dim: int | None) -> None:
        """``dataset.dim`` (which the MLP backbone reads) must be this distribution's."""
        if dim is not None and dim != self.dim:
            raise ValueError(f"dataset.dim must be {self.dim} for {type(self).__name__} (got {dim})")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class SwissRoll(ToyData):
    """sklearn's ``make_swiss_roll`` projected on its (x, z) plane and scaled.

    sklearn draws with numpy, so each call takes a fresh numpy seed from the torch
    generator: the stream stays reproducible from the run's one seed.
    """

    dim = 2

    def __init__(self, noise: float = 0.5, scale: float = 0.1, dim: int | None = None):
        self._check_dim(dim)
        if scale <= 0:
            raise ValueError(f"dataset.scale must be > 0 (got {scale})")
        self.noise, self.scale = float(noise), float(scale)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
        pts, _ = make_swiss_roll(n_samples=n, noise=self.noise, random_state=np.random.RandomState(seed))
        return torch.from_numpy(pts[:, [0, 2]] * self.scale).float()


class GaussianMixture1D(ToyData):
    """``sum_i w_i N(mean_i, std_i^2)``; exact density and score for tests and Figure 1."""

    dim = 1

    def __init__(self, weights, means, stds, dim: int | None = None):
        self._check_dim(dim)
        w, m, s = (torch.as_tensor(list(v), dtype=torch.float64) for v in (weights, means, stds))
        if not (w.shape == m.shape == s.shape):
            raise ValueError("dataset.weights, means and stds must have the same length")
        if (w < 0).any() or (s <= 0).any():
            raise ValueError("dataset.weights must be >= 0 and dataset.stds > 0")
        self.weights, self.means, self.stds = w / w.sum(), m, s

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp] * z).float().unsqueeze(-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """``[n]`` exact log density of ``x [n, 1]``."""
        x = x.to(torch.float64)
        comp = (torch.log(self.weights) - 0.5 * ((x - self.means) / self.stds) ** 2
                - torch.log(self.stds) - 0.5 * math.log(2 * math.pi))
        return torch.logsumexp(comp, dim=-1)

    def noised(self, alpha: float, sigma: float) -> "GaussianMixture1D":
        """The mixture of ``alpha x0 + sigma eps``: exact marginals of a Gaussian forward process."""
        return GaussianMixture1D(self.weights, alpha * self.means, (alpha**2 * self.stds**2 + sigma**2).sqrt())

    def score(self, x: Tensor) -> Tensor:
        """``[n, 1]`` exact ``d/dx log p(x)``."""
        with torch.enable_grad():  # works inside no_grad evaluation code too
            x = x.detach().to(torch.float64).requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(x).sum(), x)
        return g.float()
