"""The record of one batch of generative chains ``x_{k+1} ~ N(mean_k, std_k^2 I)``."""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import Tensor

from .conditioning import Cond, index_cond


@dataclass
class Trajectory:
    """Shapes use ``K`` = number of steps, ``B`` = batch, ``E`` = event shape (``d`` for vectors,
    ``L, V`` for one-hot sequences, ``C, H, W`` for latents).

    States inside the gradient window carry the graph back to the parameters; the rest are
    plain tensors. ``outputs`` are whatever the policy fed the transition (the network's
    score / drift, or the q-learning policy's sampled action).
    """

    states: Tensor  #: [K+1, B, *E]  x_0 (prior draw) … x_K (final sample)
    times: Tensor  #: [K+1]  forward times s_k, decreasing from T to t_min
    outputs: Tensor  #: [K, B, *E]  score / drift / action used at step k
    means: Tensor  #: [K, B, *E]  transition means
    stds: Tensor  #: [K]  transition stds (0 for deterministic samplers)
    noises: Tensor  #: [K, B, *E]  standard normal draws, x_{k+1} = mean_k + std_k * noise_k
    kl: Tensor | None = None  #: [K, B]  per-step KL to the reference (pretrained) chain
    grad_start: int = 0  #: first step whose transition carries gradient (K = none)
    cond: Cond = None  #: None or name -> per-chain tensor [B, ...] (text embeddings, …)

    @property
    def num_steps(self) -> int:
        return self.outputs.shape[0]

    @property
    def final(self) -> Tensor:
        """``[B, *E]`` the generated samples."""
        return self.states[-1]

    @property
    def event_dims(self) -> tuple[int, ...]:
        return tuple(range(2, self.states.dim()))

    def select(self, idx: Tensor) -> "Trajectory":
        """The chains ``idx`` (per-chain tensors and conditioning indexed alike)."""
        return Trajectory(states=self.states[:, idx], times=self.times, outputs=self.outputs[:, idx],
                          means=self.means[:, idx], stds=self.stds, noises=self.noises[:, idx],
                          kl=None if self.kl is None else self.kl[:, idx], grad_start=self.grad_start,
                          cond=index_cond(self.cond, idx))

    def log_probs(self, means: Tensor | None = None, steps: range | None = None) -> Tensor:
        """``[K, B]`` log N(x_{k+1}; mean_k, std_k^2 I) of the recorded next states.

        Pass ``means`` recomputed under new parameters (PPO ratios), for the ``steps`` they
        were recomputed at (default all); the states are always the recorded (detached) ones.
        """
        if (self.stds <= 0).all():
            raise ValueError("log-probabilities need a stochastic sampler (std > 0 at some step)")
        steps = range(self.num_steps) if steps is None else steps
        window = slice(steps.start, steps.stop)
        return gaussian_log_prob(self.states[steps.start + 1:steps.stop + 1].detach(),
                                 self.means[window] if means is None else means, self.stds[window])

    def path_kl(self) -> Tensor:
        """``[B]`` KL between the path measures, the sum of per-step KLs."""
        if self.kl is None:
            raise ValueError("trajectory was rolled out without a reference model")
        return self.kl.sum(0)


@dataclass
class Generation:
    """What a method's ``generate(n, generator, cond)`` returns to the shared evaluation.

    ``states`` are the final states (what ``decode`` reads: vectors, relaxed one-hot
    sequences, latents); ``kl_terms`` are per-sample KL estimates to the pretrained model,
    each ``[n]`` (``kl_path`` for one chain; ELEGANT adds ``kl_init``); their sum is the
    reported ``kl_div``. A method that is not one chain (particles, value-guided sampling,
    an exact optimum) returns the same record.
    """

    states: Tensor  #: [n, *E]
    kl_terms: dict[str, Tensor]  #: name -> [n]


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Isotropic Gaussian log density summed over event dims.

    ``x, mean``: [K, B, *E]; ``std``: [K]. Returns [K, B]. A step with ``std = 0`` (DDIM's
    last step onto ``s = 0``) is deterministic given its input: it gets log-probability 0
    and so adds nothing to a likelihood-ratio gradient.
    """
    d = math.prod(x.shape[2:])
    noisy = (std > 0).unsqueeze(1)  # [K, 1]
    safe = torch.where(std > 0, std, torch.ones_like(std)).unsqueeze(1)
    sq = ((x - mean) ** 2).flatten(2).sum(-1)
    log_p = -0.5 * sq / safe**2 - d * torch.log(safe) - 0.5 * d * math.log(2 * math.pi)
    return torch.where(noisy, log_p, torch.zeros_like(log_p))
