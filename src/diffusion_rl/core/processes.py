"""Forward (noising) processes.

Time convention used everywhere: ``s`` is *forward* time (noise level), data at ``s = 0``
and (approximately) pure noise at ``s = T``. Samplers walk ``s`` downwards from ``T`` and
networks take ``s`` as their time input.

A process answers two kinds of question:

* about the forward SDE ``dx = f(x, s) ds + g(s) dW`` and its Gaussian marginals
  ``x_s | x_0 ~ N(alpha(s) x_0, sigma(s)^2 I)`` (score matching, Tweedie, DDIM, the ratio
  score estimator of the q-learning paper, guidance classifiers);
* how a network output turns into what samplers and methods use. The network predicts
  one ``prediction_type`` (``score``, ``eps``, ``v``, ``x0`` or ``drift``, set in the
  process's YAML); the process converts it, in this one place, to a score
  (:meth:`to_score`), a noise estimate (:meth:`to_eps`), the Tweedie estimate of the clean
  sample (:meth:`denoise`) and the drift of the generative dynamics (:meth:`reverse_drift`,
  :meth:`ode_drift`). Samplers and methods only call these, so every method works with every
  parametrisation.

Time grids come from the process too (:meth:`time_grid`): a uniform grid for the continuous
SDEs, the DDPM / Stable Diffusion timestep subsets for :class:`DiscreteVPProcess`. The time
label a network sees is ``time_scale * s``; ``time_scale`` lives in the process's YAML and
the networks with time features read it from there (``${process.time_scale}``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample (``[B]``) or scalar tensor against ``like`` (``[B, ...]``)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


PREDICTION_TYPES = ("score", "eps", "v", "x0", "drift")


#: prediction type -> (eps, x0) as functions of (x, output, alpha, sigma), for x = alpha x0 + sigma eps;
#: v = alpha eps - sigma x0 (Salimans & Ho 2022), inverted for any alpha^2 + sigma^2
_EPS_AND_X0 = {
    "score": (lambda x, out, a, sig: -sig * out, lambda x, out, a, sig: (x + sig**2 * out) / a),
    "eps": (lambda x, out, a, sig: out, lambda x, out, a, sig: (x - sig * out) / a),
    "x0": (lambda x, out, a, sig: (x - a * out) / sig, lambda x, out, a, sig: out),
    "v": (lambda x, out, a, sig: (sig * x + a * out) / (a**2 + sig**2),
          lambda x, out, a, sig: (a * x - sig * out) / (a**2 + sig**2)),
}


class ForwardProcess:
    """Base class. Subclasses define ``f``, ``g`` and, when Gaussian, ``marginal_coeffs``."""

    #: horizon of the forward process
    T: float
    #: smallest time the sampler goes down to (0 for the OU process, 1e-3 for VP)
    t_min: float = 0.0
    #: what the network outputs (one of PREDICTION_TYPES)
    prediction_type: str = "score"
    #: the network's time label is ``time_scale * s``
    time_scale: float = 1.0
    #: prediction types this process can convert
    supported_predictions: tuple[str, ...] = ("score", "eps", "v", "x0")

    def _set_parametrisation(self, prediction_type: str, time_scale: float) -> None:
        if prediction_type not in self.supported_predictions:
            raise ValueError(f"process.prediction_type must be one of {', '.join(self.supported_predictions)} "
                             f"for {type(self).__name__} (got {prediction_type!r})")
        if time_scale <= 0:
            raise ValueError(f"process.time_scale must be > 0 (got {time_scale})")
        self.prediction_type, self.time_scale = prediction_type, float(time_scale)

    # --- time grid of the samplers -----------------------------------------------------------
    def time_grid(self, num_steps: int) -> Tensor:
        """``[K+1]`` forward times from ``T`` down to ``t_min``; step ``k`` goes from entry ``k``
        to entry ``k + 1``. Continuous processes: uniform."""
        return torch.linspace(self.T, self.t_min, int(num_steps) + 1)

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

    # --- network outputs ------------------------------------------------------------------
    def to_score(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        """``grad_x log p_s(x)`` estimated by a network output of this process's prediction type."""
        if self.prediction_type == "score":
            return output
        _, sigma = self._coeffs(x, s)
        return -self.to_eps(x, s, output) / sigma

    def to_eps(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        """The noise ``eps`` of ``x = alpha x_0 + sigma eps`` estimated by ``output``."""
        return self._convert(x, s, output, 0, "noise")

    def denoise(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        """Tweedie's estimate ``E[x_0 | x_s = x]`` from a network output."""
        return self._convert(x, s, output, 1, "Tweedie")

    def _convert(self, x: Tensor, s: Tensor, output: Tensor, which: int, what: str) -> Tensor:
        if self.prediction_type not in _EPS_AND_X0:
            raise ValueError(f"{type(self).__name__}: a {self.prediction_type} prediction has no {what} estimate")
        alpha, sigma = self._coeffs(x, s)
        return _EPS_AND_X0[self.prediction_type][which](x, output, alpha, sigma)

    def from_score(self, x: Tensor, s: Tensor, score: Tensor) -> Tensor:
        """The network output of this prediction type that corresponds to ``score`` (the inverse
        of :meth:`to_score`): how a method that edits the score (guidance) edits the output."""
        kind = self.prediction_type
        if kind == "score":
            return score
        alpha, sigma = self._coeffs(x, s)
        eps, x0 = -sigma * score, (x + sigma**2 * score) / alpha
        if kind == "eps":
            return eps
        if kind == "x0":
            return x0
        if kind == "v":
            return alpha * eps - sigma * x0
        raise ValueError(f"{type(self).__name__}: a {kind!r} prediction cannot be written from a score")

    def _coeffs(self, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.marginal_coeffs(s)
        return _bcast(alpha, x), _bcast(sigma, x)

    # --- generative dynamics ----------------------------------------------------------
    def reverse_drift(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        """Drift of the reverse-time SDE (per unit of decreasing ``s``) given a network output."""
        return -self.f(x, s) + _bcast(self.g(s) ** 2, x) * self.to_score(x, s, output)

    def ode_drift(self, x: Tensor, s: Tensor, output: Tensor) -> Tensor:
        """Drift of the probability-flow ODE given a network output."""
        return -self.f(x, s) + 0.5 * _bcast(self.g(s) ** 2, x) * self.to_score(x, s, output)

    def reverse_diffusion(self, s: Tensor) -> Tensor:
        return self.g(s)


class OUProcess(ForwardProcess):
    """Time-homogeneous OU process ``dx = -theta x ds + sigma dW`` (q-learning paper, eq. 32).

    With ``theta = 1, sigma = sqrt(2)`` it is variance preserving with
    ``alpha(s) = exp(-s)`` and ``sigma(s)^2 = 1 - exp(-2 s)``.
    """

    def __init__(self, T: float = 5.0, theta: float = 1.0, sigma: float = math.sqrt(2.0), t_min: float = 0.0,
                 prediction_type: str = "score", time_scale: float = 1.0):
        if T <= 0:
            raise ValueError(f"process.T must be > 0 (got {T})")
        self.T, self.theta, self.sigma, self.t_min = float(T), float(theta), float(sigma), float(t_min)
        self._set_parametrisation(prediction_type, time_scale)

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

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_min: float = 1e-3,
                 prediction_type: str = "score", time_scale: float = 1000.0):
        if T <= 0:
            raise ValueError(f"process.T must be > 0 (got {T})")
        self.beta_min, self.beta_max, self.T, self.t_min = float(beta_min), float(beta_max), float(T), float(t_min)
        self._set_parametrisation(prediction_type, time_scale)

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


class DiscreteVPProcess(ForwardProcess):
    """The discrete variance-preserving chain of DDPM and Stable Diffusion.

    Forward time is the integer timestep ``t = 0 .. N-1`` (stored as floats), with
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and ``abar_t = prod_{i <= t} (1 - beta_i)``
    for a ``linear`` or ``scaled_linear`` (SD: linear in sqrt(beta)) beta schedule, or an
    explicit ``alphas_cumprod`` list. Samplers walk a subset of the timesteps chosen as
    diffusers' ``DDIMScheduler`` does (``timestep_spacing``: ``leading`` + ``steps_offset``,
    SD 1.5's choice; ``trailing``; ``linspace``) and step from ``t`` to ``t - N // K``; below 0
    the chain lands on ``abar = 1`` (``set_alpha_to_one``) or on ``abar_0`` (SD 1.5). Where the
    rounded timesteps are not ``N // K`` apart (``linspace``; ``trailing`` when K does not
    divide N) each step goes to the next timestep of the grid, a proper chain, where
    diffusers' DDIM steps to ``t - N // K`` instead.

    There is no SDE behind the chain (no ``f``, ``g``): sample it with DDIM(eta), which with
    ``eta = 1`` is DDPM's ancestral sampler. The network sees ``time_scale * t`` (1: the
    timestep itself, as a UNet expects).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", alphas_cumprod: list[float] | None = None,
                 timestep_spacing: str = "leading", steps_offset: int = 1, set_alpha_to_one: bool = False,
                 prediction_type: str = "eps", time_scale: float = 1.0):
        if alphas_cumprod is not None:
            abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        else:
            if num_train_timesteps < 2:
                raise ValueError(f"process.num_train_timesteps must be >= 2 (got {num_train_timesteps})")
            if beta_schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
            elif beta_schedule == "scaled_linear":
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
            else:
                raise ValueError(f"process.beta_schedule must be linear or scaled_linear (got {beta_schedule!r})")
            abar = torch.cumprod(1 - betas, 0)
        if abar.dim() != 1 or not ((abar > 0) & (abar < 1)).all() or (abar[1:] > abar[:-1]).any():
            raise ValueError("process.alphas_cumprod must be a decreasing sequence in (0, 1)")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"process.timestep_spacing must be leading, trailing or linspace (got {timestep_spacing!r})")
        # float32 like diffusers' schedulers, so DDIM steps agree with theirs to float precision
        self.alphas_cumprod = abar.float()
        self.num_train_timesteps = len(abar)
        self.timestep_spacing, self.steps_offset = timestep_spacing, int(steps_offset)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.T, self.t_min = float(self.num_train_timesteps - 1), 0.0
        self._set_parametrisation(prediction_type, time_scale)

    def timesteps(self, num_steps: int) -> Tensor:
        """``[K]`` the timesteps a K-step sampler visits, decreasing (diffusers' ``set_timesteps``)."""
        N, K = self.num_train_timesteps, int(num_steps)
        if not 0 < K <= N:
            raise ValueError(f"sampler.num_steps must be in 1..{N} for this schedule (got {K})")
        if self.timestep_spacing == "leading":
            t = torch.arange(K, dtype=torch.float64) * (N // K) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            t = torch.round(torch.arange(N, 0, -N / K, dtype=torch.float64)) - 1
            return t.clamp(0, N - 1)
        else:
            t = torch.round(torch.linspace(0, N - 1, K, dtype=torch.float64))
        return t.flip(0).clamp(0, N - 1)

    def time_grid(self, num_steps: int) -> Tensor:
        t = self.timesteps(num_steps)
        return torch.cat([t, t[-1:] - self.num_train_timesteps // int(num_steps)]).float()

    def marginal_coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=torch.get_default_dtype())
        idx = s.round().long()
        abar = self.alphas_cumprod.to(s.device)[idx.clamp(0, self.num_train_timesteps - 1)]
        abar = torch.where(idx >= 0, abar, torch.full_like(abar, self.final_alpha_cumprod)).to(s.dtype)
        return abar.sqrt(), (1 - abar).sqrt()

    def prior_sample(self, shape, generator=None, device="cpu") -> Tensor:
        # N(0, I), as diffusers' pipelines start (init_noise_sigma = 1), not sigma(T) N(0, I)
        return torch.randn(shape, generator=generator, device=device)


class BrownianBridgeProcess(ForwardProcess):
    """Brownian bridge between ``N(0, I)`` (at ``s = 1``) and the data (at ``s = 0``).

    Bridge matching (ELEGANT App. D, tutorial §9) regresses the drift of
    ``dx = b(x, tau) dtau + eps dW`` with ``tau = 1 - s``: for a pair ``(x_noise, x_data)`` the
    bridge point is ``x = s x_noise + (1 - s) x_data + eps sqrt(s (1 - s)) z`` and the
    conditional drift is ``(x_data - x) / s``. The network predicts the drift
    (``prediction_type: drift``), so ``reverse_drift`` is the identity; there is no Gaussian
    marginal given data alone, hence no score, no Tweedie estimate and no ODE / DDIM sampler.
    """

    supported_predictions = ("drift",)

    def __init__(self, eps: float = 1.0, T: float = 1.0, t_min: float = 0.0, prediction_type: str = "drift",
                 time_scale: float = 1.0):
        if T <= 0:
            raise ValueError(f"process.T must be > 0 (got {T})")
        self.eps, self.T, self.t_min = float(eps), float(T), float(t_min)
        self._set_parametrisation(prediction_type, time_scale)

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


def check_tweedie(process: ForwardProcess, times: Tensor, event_shape, instead: str) -> None:
    """Refuse, with one line naming the alternative, a Tweedie value on a process whose network
    output has no ``x0`` estimate (a drift-parametrised bridge)."""
    x = torch.zeros(1, *event_shape)
    try:
        process.denoise(x, times[:1], x)
    except ValueError as e:
        raise ValueError(f"method.value=tweedie: {e} (use {instead})") from None
