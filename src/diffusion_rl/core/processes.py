"""Forward (noising) processes.

Time convention used everywhere: ``s`` is *forward* time (noise level), data at ``s = 0``
and (approximately) pure noise at ``s = T``. Samplers walk ``s`` downwards from ``T`` and
networks take ``s`` as their time input.

A process answers two kinds of question:

* about the forward SDE ``dx = f(x, s) ds + g(s) dW`` and its Gaussian marginals
  ``x_s | x_0 ~ N(alpha(s) x_0, sigma(s)^2 I)`` (score matching, Tweedie, DDIM, the ratio
  score estimator of the q-learning paper, guidance classifiers);
* how a network output turns into the drift of the generative (reverse-time) dynamics
  (``reverse_drift``). For score-parametrised processes the network predicts the score;
  for the Brownian bridge it predicts the drift itself. Samplers only call this method,
  so every method works with either parametrisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample (``[B]``) or scalar tensor against ``like`` (``[B, ...]``)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


class ForwardProcess:
    """Base class. Subclasses define ``f``, ``g`` and, when Gaussian, ``marginal_coeffs``."""

    #: horizon of the forward process
    T: float
    #: smallest time the sampler goes down to (0 for the OU process, 1e-3 for VP)
    t_min: float = 0.0
    #: whether the network predicts the score (True) or the reverse drift itself (False)
    score_parametrised: bool = True

    # --- forward SDE -------------------------------------------------------------------
    def f(self, x: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def g(self, s: Tensor) -> Tensor:
        raise NotImplementedError

    # --- Gaussian marginals --------------------------------------------------------------
    def marginal_coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(s), sigma(s))`` with ``x_s = alpha x_0 + sigma eps``."""
        raise NotImplementedError(f"{type(self).__name__} has no Gaussian marginal")

    def marginal(self, x0: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[B, ...]`` and std ``[B, 1, ...]`` of ``x_s | x_0`` for per-sample times ``s [B]``."""
        alpha, sigma = self.marginal_coeffs(s)
        return _bcast(alpha, x0) * x0, _bcast(sigma, x0)

    def conditional_score(self, x: Tensor, x0: Tensor, s: Tensor) -> Tensor:
        """``grad_x log p_{s|0}(x | x0)``, the denoising score matching target."""
        mean, std = self.marginal(x0, s)
        return -(x - mean) / std**2

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
        """Sample the generative chain's starting distribution at ``s = T``."""
        _, sigma = self.marginal_coeffs(torch.tensor(self.T))
        return sigma.item() * torch.randn(shape, generator=generator, device=device)

    # --- generative dynamics ----------------------------------------------------------
    def reverse_drift(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        """Drift of the reverse-time SDE (per unit of decreasing ``s``) given a score."""
        return -self.f(x, s) + _bcast(self.g(s) ** 2, x) * output

    def ode_drift(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        """Drift of the probability-flow ODE given a score."""
        return -self.f(x, s) + 0.5 * _bcast(self.g(s) ** 2, x) * output

    def reverse_diffusion(self, s: Tensor) -> Tensor:
        return self.g(s)


class OUProcess(ForwardProcess):
    """Time-homogeneous OU process ``dx = -theta x ds + sigma dW`` (q-learning paper, eq. 32).

    With ``theta = 1, sigma = sqrt(2)`` it is variance preserving with
    ``alpha(s) = exp(-s)`` and ``sigma(s)^2 = 1 - exp(-2 s)``.
    """

    def __init__(self, T: float = 5.0, theta: float = 1.0, sigma: float = math.sqrt(2.0), t_min: float = 0.0):
        if T <= 0:
            raise ValueError(f"process.T must be > 0 (got {T})")
        self.T, self.theta, self.sigma, self.t_min = float(T), float(theta), float(sigma), float(t_min)

    def f(self, x: Tensor, s: Tensor) -> Tensor:
        return -self.theta * x

    def g(self, s: Tensor) -> Tensor:
        return torch.full_like(torch.as_tensor(s, dtype=torch.get_default_dtype()), self.sigma)

    def marginal_coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=torch.get_default_dtype())
        alpha = torch.exp(-self.theta * s)
        var = self.sigma**2 / (2 * self.theta) * (1 - torch.exp(-2 * self.theta * s))
        return alpha, var.clamp_min(0).sqrt()


class StationaryOUProcess(OUProcess):
    """``dx = -x/2 ds + std dW`` started at its stationary law ``N(0, std^2 I)``: the reference SDE
    of ELEGANT's initial-distribution problem (§6), whose marginal stays ``N(0, std^2 I)`` on
    the whole interval ``[-T0, 0]``. It is its own time reversal, so the score-parametrised
    reverse drift with the exact stationary score ``-x / std^2`` gives back ``-x/2``; a control
    ``u`` enters as ``score = -x / std^2 + u / std^2``.
    """

    def __init__(self, T: float = 1.0, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"initial process std must be > 0 (got {std})")
        super().__init__(T=T, theta=0.5, sigma=std)
        self.std = float(std)

    def prior_sample(self, shape, generator=None, device="cpu") -> Tensor:
        return self.std * torch.randn(shape, generator=generator, device=device)

    def stationary_score(self, x: Tensor) -> Tensor:
        return -x / self.std**2


class VPProcess(ForwardProcess):
    """Variance-preserving SDE with linear ``beta(s) = beta_min + s (beta_max - beta_min)`` on [0, 1]
    (Song et al. 2021): ``dx = -beta/2 x ds + sqrt(beta) dW``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_min: float = 1e-3):
        if T <= 0:
            raise ValueError(f"process.T must be > 0 (got {T})")
        self.beta_min, self.beta_max, self.T, self.t_min = float(beta_min), float(beta_max), float(T), float(t_min)

    def beta(self, s: Tensor) -> Tensor:
        return self.beta_min + torch.as_tensor(s, dtype=torch.get_default_dtype()) * (self.beta_max - self.beta_min)

    def f(self, x: Tensor, s: Tensor) -> Tensor:
        return -0.5 * _bcast(self.beta(s), x) * x

    def g(self, s: Tensor) -> Tensor:
        return self.beta(s).sqrt()

    def marginal_coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=torch.get_default_dtype())
        log_alpha = -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min
        alpha = log_alpha.exp()
        return alpha, (1 - alpha**2).clamp_min(0).sqrt()


class BrownianBridgeProcess(ForwardProcess):
    """Brownian bridge between ``N(0, I)`` (at ``s = 1``) and the data (at ``s = 0``).

    Bridge matching (ELEGANT App. D, tutorial §9) regresses the drift of
    ``dx = b(x, tau) dtau + eps dW`` with ``tau = 1 - s``: for a pair ``(x_noise, x_data)`` the
    bridge point is ``x = s x_noise + (1 - s) x_data + eps sqrt(s (1 - s)) z`` and the
    conditional drift is ``(x_data - x) / s``. The network predicts the drift, so
    ``reverse_drift`` is the identity; there is no Gaussian marginal given data alone,
    hence no ODE / DDIM sampler for this process.
    """

    score_parametrised = False

    def __init__(self, eps: float = 1.0, T: float = 1.0, t_min: float = 0.0):
        if T <= 0:
            raise ValueError(f"process.T must be > 0 (got {T})")
        self.eps, self.T, self.t_min = float(eps), float(T), float(t_min)

    def prior_sample(self, shape, generator=None, device="cpu") -> Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def bridge_sample(self, x_noise: Tensor, x_data: Tensor, s: Tensor, generator=None) -> tuple[Tensor, Tensor]:
        """A bridge point at per-sample times ``s [B]`` and its drift regression target."""
        sb = _bcast(s, x_data)
        z = torch.randn(x_data.shape, generator=generator).to(x_data)
        x = sb * x_noise + (1 - sb) * x_data + self.eps * (sb * (1 - sb)).clamp_min(0).sqrt() * z
        return x, (x_data - x) / sb

    def reverse_drift(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        return output

    def ode_drift(self, x, s, output):
        raise NotImplementedError("bridge matching learns an SDE drift; use the Euler–Maruyama sampler")

    def reverse_diffusion(self, s: Tensor) -> Tensor:
        return torch.full_like(torch.as_tensor(s, dtype=torch.get_default_dtype()), self.eps)
