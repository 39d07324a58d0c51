"""Samplers: one time grid, one rollout loop, and a per-sampler Gaussian transition.

Every sampler is a chain ``x_{k+1} = mean_k(x_k, output_k) + std_k * noise_k``; subclasses
only say how to turn a network output into ``(mean_k, std_k)``. The rollout records the
chain as a :class:`~diffusion_rl.core.trajectory.Trajectory` with gradients flowing only
through the steps of a :class:`GradWindow`, optionally checkpointed step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .conditioning import Cond, check_cond, repeat_cond
from .processes import ForwardProcess, _bcast
from .trajectory import Trajectory

#: ``policy(x [B, *E], s [B], cond) -> output [B, *E]``: a backbone, or a wrapper around one;
#: ``cond`` is ``None`` or a mapping of per-chain tensors (:mod:`.conditioning`)
Policy = Callable[[Tensor, Tensor, Cond], Tensor]


@dataclass
class GradWindow:
    """Which steps of a rollout carry gradient to the parameters.

    * ``none``: no step (policy-gradient methods recompute log-probs afterwards);
    * ``all``: full backpropagation through the chain (reward backprop, ELEGANT);
    * ``last_k``: the last ``k`` steps, earlier states detached (DRaFT-K truncation);
    * ``random_k``: the last ``K`` steps with ``K ~ U{1..k}`` drawn per rollout (AlignProp).
    """

    kind: str = "none"
    k: int = 1

    def __post_init__(self):
        if self.kind not in ("none", "all", "last_k", "random_k"):
            raise ValueError(f"grad_window.kind must be none|all|last_k|random_k (got {self.kind!r})")
        if self.kind in ("last_k", "random_k") and self.k < 1:
            raise ValueError(f"grad_window.k must be >= 1 (got {self.k})")

    def start(self, num_steps: int, generator: torch.Generator | None = None) -> int:
        """Index of the first step that carries gradient (``num_steps`` means none)."""
        if self.kind == "none":
            return num_steps
        if self.kind == "all":
            return 0
        k = min(self.k, num_steps)
        if self.kind == "random_k":
            k = int(torch.randint(1, k + 1, (1,), generator=generator).item())
        return num_steps - k


class Sampler:
    """Base sampler over the process's time grid ``s_0 = T > s_1 > ... > s_K`` (uniform for
    the continuous SDEs, a subset of the training timesteps for the discrete VP chain)."""

    stochastic: bool = True

    def __init__(self, process: ForwardProcess, num_steps: int, final_noise: bool = True):
        if num_steps <= 0:
            raise ValueError(f"sampler.num_steps must be > 0 (got {num_steps})")
        self.process = process
        self.num_steps = int(num_steps)
        # False: the last step returns its mean (Song et al. 2021's "denoise" of the final
        # sample). With few steps the last step's noise is large (VP, 10 steps: std 0.46 per
        # coordinate), enough to flip the argmax of a one-hot state; the step is then
        # deterministic, so it adds no log-probability and its KL is the control cost.
        self.final_noise = bool(final_noise)
        self.times = process.time_grid(self.num_steps)

    @property
    def dt(self) -> float:
        """The first step's size (the only one, on a uniform grid)."""
        return float(self.times[0] - self.times[1])

    def _grid(self, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``s_k`` and step size ``s_k - s_{k+1}`` (both ``[B]``) on ``x``'s device."""
        times = self.times.to(x.device)
        return times[k], times[k] - times[k + 1]

    # --- one step -----------------------------------------------------------------------
    def transition(self, x: Tensor, k: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[B, *E]`` and std ``[B]`` of ``x_{k+1}`` given ``x = x_k`` and per-sample step
        indices ``k [B]`` (per-sample so all steps of a trajectory can be recomputed in one batch)."""
        raise NotImplementedError

    def step_kl(self, x: Tensor, k: Tensor, output: Tensor, ref_output: Tensor,
                mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
        """``[B]`` KL between this step's transition and the reference one.

        Stochastic steps: the exact Gaussian KL ``|mean - ref_mean|^2 / (2 std^2)``. A
        deterministic step has no KL, so we use the Girsanov control cost of the two
        generative SDEs over the step, ``dt |drift - ref_drift|^2 / (2 g^2)`` (for a score
        network ``g^2 dt |score - ref_score|^2 / 2``). A chain with no SDE behind it (the
        discrete VP schedule) has no such cost: its deterministic steps are refused.
        """
        dims = tuple(range(1, x.dim()))
        if self.stochastic and bool((std > 0).all()):
            return ((mean - ref_mean) ** 2).sum(dims) / (2 * std**2)
        s, dt = self._grid(x, k)
        try:
            g2 = self.process.reverse_diffusion(s) ** 2
        except NotImplementedError:
            raise ValueError(f"a deterministic step of {type(self.process).__name__} (no SDE) has no KL to the "
                             "reference: use a stochastic sampler (sampler.eta > 0) with sampler.final_noise=true") from None
        delta = self.process.reverse_drift(x, s, output) - self.process.reverse_drift(x, s, ref_output)
        control_cost = dt * (delta**2).sum(dims) / (2 * g2)
        if not self.stochastic:
            return control_cost
        gaussian = ((mean - ref_mean) ** 2).sum(dims) / (2 * torch.where(std > 0, std, torch.ones_like(std)) ** 2)
        return torch.where(std > 0, gaussian, control_cost)  # a zero-noise step of a stochastic sampler

    # --- whole chains -----------------------------------------------------------------------
    def rollout(
        self,
        policy: Policy,
        batch_size: int | None = None,
        *,
        generator: torch.Generator | None = None,
        x_init: Tensor | None = None,
        event_shape: tuple[int, ...] | None = None,
        cond: Cond = None,
        reference: Policy | None = None,
        grad_window: GradWindow | None = None,
        window_generator: torch.Generator | None = None,
        checkpoint_steps: bool = False,
        device: torch.device | str = "cpu",
    ) -> Trajectory:
        """Simulate ``K`` steps from ``x_init`` (or a prior draw of ``batch_size x event_shape``).

        ``generator`` draws the chain's noise on its device; ``window_generator`` (a CPU
        generator, default ``generator``) draws a random-K window's length."""
        if x_init is None:
            x = self.process.prior_sample((batch_size, *event_shape), generator=generator, device=device)
        else:
            x = x_init
        B, K = x.shape[0], self.num_steps
        check_cond(cond, B)
        grad_start = (grad_window or GradWindow()).start(K, window_generator or generator)
        times = self.times.to(x.device)

        states, outputs, means, stds, noises, kls = [x], [], [], [], [], []
        for k in range(K):
            kk = torch.full((B,), k, dtype=torch.long, device=x.device)
            s = times[kk]
            carries_grad = k >= grad_start
            if k == grad_start:
                x = x.detach()  # truncation: nothing before the window receives gradient
            zero_last_noise = k == K - 1 and not self.final_noise
            with torch.set_grad_enabled(carries_grad and torch.is_grad_enabled()):
                if carries_grad and checkpoint_steps:
                    out, mean, std, kl = checkpoint(self._step, policy, x, kk, s, cond, reference, zero_last_noise,
                                                    use_reentrant=False)
                else:
                    out, mean, std, kl = self._step(policy, x, kk, s, cond, reference, zero_last_noise)
            if kl is not None:
                kls.append(kl)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = mean + _bcast(std, mean) * noise if self.stochastic else mean  # std = 0: the mean
            states.append(x)
            outputs.append(out)
            means.append(mean)
            stds.append(std[0])
            noises.append(noise)
        return Trajectory(
            states=torch.stack(states), times=times, outputs=torch.stack(outputs),
            means=torch.stack(means), stds=torch.stack(stds), noises=torch.stack(noises),
            kl=torch.stack(kls) if kls else None, grad_start=grad_start, cond=cond,
        )

    def _step(self, policy: Policy, x: Tensor, k: Tensor, s: Tensor, cond: Cond,
              reference: Policy | None = None, zero_noise: bool = False):
        out = policy(x, s, cond)
        mean, std = self.transition(x, k, out)
        if zero_noise:
            std = torch.zeros_like(std)
        if reference is None:
            return out, mean, std, None
        # The reference is evaluated at the *visited* state with gradient enabled: its
        # parameters are frozen, but x_k depends on the fine-tuned parameters, and the
        # pathwise gradient of E[sum_k KL_k(x_k)] needs d m_pre(x_k) / d x_k as much as
        # d m_theta(x_k) / d x_k. Under no_grad that term is lost and the chain settles at
        # a wrong optimum, with the control pushed into the last steps (tests/test_kl_gradient.py).
        ref_out = reference(x, s, cond)
        ref_mean, _ = self.transition(x, k, ref_out)
        return out, mean, std, self.step_kl(x, k, out, ref_out, mean, ref_mean, std)

    def recompute_means(self, policy: Policy, traj: Trajectory, steps: range | None = None,
                        chunk_steps: int | None = None) -> Tensor:
        """``[k, B, *E]`` transition means of the recorded states at ``steps`` (default: all K)
        under ``policy`` — PPO-style ratios and DPOK's KL need them under other parameters.

        Each call of the policy batches ``chunk_steps`` steps x B chains (default: all the
        steps asked for, one call); for a large backbone keep it small, or ask for a few
        ``steps`` at a time and backpropagate each (the policy-gradient methods do)."""
        steps = range(traj.num_steps) if steps is None else steps
        chunk = len(steps) if chunk_steps is None else int(chunk_steps)
        if chunk < 1:
            raise ValueError(f"chunk_steps must be >= 1 (got {chunk_steps})")
        means = [self._recompute(policy, traj, steps[i:i + chunk]) for i in range(0, len(steps), chunk)]
        return means[0] if len(means) == 1 else torch.cat(means)

    def _recompute(self, policy: Policy, traj: Trajectory, steps: range) -> Tensor:
        B, n = traj.states.shape[1], len(steps)
        x = traj.states[steps.start:steps.stop].detach().flatten(0, 1)
        k = torch.arange(steps.start, steps.stop, device=x.device).repeat_interleave(B)
        out = policy(x, self.times.to(x.device)[k], repeat_cond(traj.cond, n))
        mean, _ = self.transition(x, k, out)
        return mean.reshape(n, *traj.means.shape[1:])


class EulerMaruyama(Sampler):
    """Euler–Maruyama on the reverse SDE: ``x + drift dt + g sqrt(dt) noise`` (q-learning eq. 33)."""

    stochastic = True

    def transition(self, x, k, output):
        s, dt = self._grid(x, k)
        mean = x + self.process.reverse_drift(x, s, output) * _bcast(dt, x)
        return mean, self.process.reverse_diffusion(s) * dt.sqrt()


class ODEEuler(Sampler):
    """Euler steps on the probability-flow ODE (Song et al. 2021): deterministic."""

    stochastic = False

    def transition(self, x, k, output):
        s, dt = self._grid(x, k)
        return x + self.process.ode_drift(x, s, output) * _bcast(dt, x), torch.zeros_like(dt)


class DDIM(Sampler):
    """DDIM(eta) written for any Gaussian marginal ``x_s = alpha x_0 + sigma eps``.

    The process turns the network output into ``eps_hat`` and Tweedie's ``x0_hat``
    (:meth:`ForwardProcess.to_eps`, :meth:`ForwardProcess.denoise`); the step to ``s'`` is
    ``alpha' x0_hat + sqrt(sigma'^2 - std^2) eps_hat + std noise`` with
    ``std^2 = eta^2 sigma'^2 (sigma^2 - (alpha / alpha')^2 sigma'^2) / sigma^2``, the DDPM
    posterior variance scaled by ``eta^2`` (eta = 0: deterministic DDIM; eta = 1: DDPM).
    On the discrete VP chain this is diffusers' ``DDIMScheduler.step`` (tested against it).
    """

    def __init__(self, process: ForwardProcess, num_steps: int, eta: float = 0.0, final_noise: bool = True):
        super().__init__(process, num_steps, final_noise)
        if eta < 0:
            raise ValueError(f"sampler.eta must be >= 0 (got {eta})")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def transition(self, x, k, output):
        times = self.times.to(x.device)
        s = times[k]
        a, sig = self.process.marginal_coeffs(s)
        a_next, sig_next = self.process.marginal_coeffs(times[k + 1])
        post_var = sig_next**2 * (sig**2 - (a / a_next) ** 2 * sig_next**2) / sig**2
        var = (self.eta**2 * post_var).clamp_min(0)
        eps_hat = self.process.to_eps(x, s, output)
        x0_hat = self.process.denoise(x, s, output)
        mean = _bcast(a_next, x) * x0_hat + _bcast((sig_next**2 - var).clamp_min(0).sqrt(), x) * eps_hat
        return mean, var.sqrt()
