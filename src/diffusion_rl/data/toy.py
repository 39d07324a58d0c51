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


def _plain(v):
    """Nested sequences (an OmegaConf ``ListConfig`` too) as nested lists of floats."""
    return float(v) if isinstance(v, (int, float)) else [_plain(e) for e in v]


class GaussianMixture2D(ToyData):
    """``sum_i w_i N(mu_i, s_i^2 I_2)``: isotropic 2-D components, with everything closed form
    that the exact-answer bench needs (``conf/experiment/exact_gaussian_mixture.yaml``): the
    density, its noised marginals and their score, and its tilt by a quadratic reward.

    The tilt (derived here, checked against importance sampling in tests/test_exact_mixture.py):
    ``exp(-lam |x - c|^2 / alpha)`` is ``(2 pi a)^{d/2} N(x; c, a I)`` with ``a = alpha / (2 lam)``,
    and a product of two Gaussian densities is ``N(c; mu_i, (s_i^2 + a) I) N(x; m_i', v_i' I)`` with
    ``1/v_i' = 1/s_i^2 + 1/a`` and ``m_i' = v_i' (mu_i / s_i^2 + c / a)``; so the tilted law is
    again a mixture, with weights ``∝ w_i N(c; mu_i, (s_i^2 + a) I)``, and the normaliser
    ``Z = E_data exp(r / alpha) = (2 pi a)^{d/2} sum_i w_i N(c; mu_i, (s_i^2 + a) I)``.
    """

    dim = 2

    def __init__(self, weights, means, stds, dim: int | None = None):
        self._check_dim(dim)
        # lists from a YAML (OmegaConf containers), or tensors (noised, tilted)
        w, m, s = (v.to(torch.float64) if torch.is_tensor(v) else torch.tensor(_plain(v), dtype=torch.float64)
                   for v in (weights, means, stds))
        if m.dim() != 2 or m.shape[1] != self.dim:
            raise ValueError(f"dataset.means must be a list of {self.dim}-vectors (got shape {tuple(m.shape)})")
        if not (w.shape[0] == m.shape[0] == s.shape[0]) or w.dim() != 1 or s.dim() != 1:
            raise ValueError("dataset.weights, means and stds must have the same length")
        if (w < 0).any() or w.sum() <= 0 or (s <= 0).any():
            raise ValueError("dataset.weights must be >= 0 (not all 0) and dataset.stds > 0")
        self.weights, self.means, self.stds = w / w.sum(), m, s

    @property
    def variances(self) -> Tensor:
        return self.stds**2

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp, None] * z).float()

    def component_log_probs(self, x: Tensor) -> Tensor:
        """``[n, C]``: ``log w_i + log N(x; mu_i, s_i^2 I)`` for ``x [n, 2]`` (float64)."""
        x = x.to(torch.float64)
        d2 = ((x[:, None, :] - self.means.to(x.device)) ** 2).sum(-1)
        var = self.variances.to(x.device)
        return (torch.log(self.weights.to(x.device)) - 0.5 * d2 / var
                - 0.5 * self.dim * (torch.log(var) + math.log(2 * math.pi)))

    def log_prob(self, x: Tensor) -> Tensor:
        """``[n]`` exact log density of ``x [n, 2]``."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """``[n, C]`` posterior probability of each component given ``x``."""
        return torch.softmax(self.component_log_probs(x), dim=-1)

    def noised(self, alpha: float, sigma: float) -> "GaussianMixture2D":
        """The mixture of ``alpha x0 + sigma eps``: exact marginals of a Gaussian forward process."""
        return GaussianMixture2D(self.weights, alpha * self.means, (alpha**2 * self.variances + sigma**2).sqrt())

    def score(self, x: Tensor) -> Tensor:
        """``[n, 2]`` exact ``grad_x log p(x)``: ``sum_i p(i | x) (mu_i - x) / s_i^2``."""
        x64 = x.to(torch.float64)
        resp = self.responsibilities(x64)
        pulls = (self.means.to(x.device) - x64[:, None, :]) / self.variances.to(x.device)[:, None]
        return (resp[..., None] * pulls).sum(1).to(x.dtype)

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def tilt_parameters(self, target, scale: float, kl_weight: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(weights', means', stds', log Z)`` of ``exp(-scale |x - target|^2 / kl_weight) p(x) / Z``."""
        if kl_weight <= 0 or scale <= 0:
            raise ValueError(f"the tilt needs kl_weight > 0 and scale > 0 (got {kl_weight}, {scale})")
        c = torch.as_tensor(target, dtype=torch.float64).reshape(-1)
        if c.numel() != self.dim:
            raise ValueError(f"the reward's target must be a {self.dim}-vector (got {c.numel()} numbers)")
        a = kl_weight / (2 * scale)  # exp(r / alpha) is a Gaussian in x of variance a (times a constant)
        var = self.variances
        new_var = 1 / (1 / var + 1 / a)
        new_means = new_var[:, None] * (self.means / var[:, None] + c / a)
        # log w_i + log N(c; mu_i, (s_i^2 + a) I), plus log (2 pi a)^{d/2} for Z
        log_w = (torch.log(self.weights) - 0.5 * ((c - self.means) ** 2).sum(-1) / (var + a)
                 - 0.5 * self.dim * (torch.log(var + a) + math.log(2 * math.pi)))
        log_z = torch.logsumexp(log_w, 0) + 0.5 * self.dim * math.log(2 * math.pi * a)
        return torch.softmax(log_w, 0), new_means, new_var.sqrt(), log_z

    def tilted(self, target, scale: float, kl_weight: float) -> "GaussianMixture2D":
        """The tilted law ``∝ exp(r / alpha) p`` for ``r(x) = -scale |x - target|^2``: a mixture again."""
        w, m, s, _ = self.tilt_parameters(target, scale, kl_weight)
        return GaussianMixture2D(w, m, s)

    def expected_quadratic_reward(self, target, scale: float) -> float:
        """``E[-scale |x - target|^2] = -scale sum_i w_i (|mu_i - target|^2 + 2 s_i^2)``."""
        c = torch.as_tensor(target, dtype=torch.float64).reshape(-1)
        return float(-scale * (self.weights * (((self.means - c) ** 2).sum(-1) + self.dim * self.variances)).sum())
