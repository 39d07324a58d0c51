"""ELEGANT (Uehara et al. 2024, Algorithm 1): entropy-regularised control with a learned
initial distribution.

The target is the tilted distribution ``p_r(x) ∝ exp(r(x) / alpha) p_pre(x)``. Fine-tuning
only the drift from the usual ``N(0, I)`` start cannot reach it (the optimal chain also moves
its start, Corollary 2), so ELEGANT runs three stages, one after the other here, each a block
of iterations of the same Lightning loop (so checkpoints and resume cover all three):

1. **Value function at t = 0**: the soft value
   ``v_0(x) = alpha log E[exp(r(x_T) / alpha) | x_0 = x]`` of the *pretrained* chain.
   ``value_target: mean`` (the paper's §7.1, its numerically stable form, our default)
   regresses ``r(x_T)`` on ``x_0``, i.e. learns ``E[r(x_T) | x_0]``; that equals ``v_0`` up to
   a constant only when ``r(x_T)`` given ``x_0`` is ``f(x_0)`` plus noise independent of
   ``x_0``. It is not in general: on the Gaussian test bed with a quadratic reward its
   curvature is 2.9x ``v_0``'s and the method lands 0.14 off the optimum
   (tests/test_closed_form_qlearning_elegant.py). ``value_target: soft`` (App. E.2) regresses
   on ``alpha · log-mean-exp(r / alpha)`` over ``value_continuations`` pretrained
   continuations of each ``x_0`` — exact in the limit, and the closed-form optimum is reached;
   it costs ``value_continuations`` times the rollouts of the value stage. On TFBind8 the
   start and the end of the chain are nearly independent, so both targets are ~constant there.
2. **Initial distribution** (§6, Theorem 2): on ``[-T0, 0]`` the reference SDE
   ``dx = -x/2 dt + dW`` keeps ``N(0, I)`` (:class:`StationaryOUProcess`); a controlled copy
   with drift ``-x/2 + u(x, t)`` is trained to maximise ``E[v(x_0)] - alpha KL`` by
   backpropagation through its Euler–Maruyama chain (Girsanov: KL = ``E sum |u|^2 dt / 2``).
   Its law at ``t = 0`` is then ``∝ exp(v(x) / alpha) N(x; 0, I)``, the optimal start.
3. **Drift control** on ``[0, T]``: reward backpropagation on ``E[r(x_T)] - alpha path KL``
   from starts drawn by stage 2 (:class:`RewardBackprop`; ``kl_weight`` is ELEGANT's alpha,
   named like every other method's KL weight so one sweep key serves all tables).

Sampling runs the stage-2 chain, then the fine-tuned chain; the evaluation's KL-Div adds the
two path KLs (eq. 5's (b2): the initial KL is bounded by its generating chain's path KL).

Networks: the value function is an MLP on the flattened ``x_0``; the initial control reuses
the backbone's architecture (a copy of the pretrained weights whose output is multiplied by
a learned gain that starts at 0, so stage 2 starts exactly at the reference SDE).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..core.conditioning import index_cond
from ..core.processes import StationaryOUProcess
from ..core.samplers import EulerMaruyama, GradWindow
from ..core.trajectory import Generation
from ..nets import FlatMLP, TimeConditionedMLP
from .reward_backprop import RewardBackprop

PHASES = ("value", "initial", "drift")


class InitialControl(nn.Module):
    """Score-parametrised policy of the initial chain: ``stationary score + gain * net(x, t)``."""

    def __init__(self, net: nn.Module, process: StationaryOUProcess):
        super().__init__()
        self.net, self.process = net, process
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        return self.process.stationary_score(x) + self.gain * self.net(x, s, cond)


class SmallScoreNet(nn.Module):
    """``(x [B, *E], s) -> [B, *E]``: an MLP on ``[flatten(x), time features]``, the initial
    control's network where copying the backbone is out of the question (a UNet)."""

    def __init__(self, event_shape: Sequence[int], hidden: Sequence[int], time_scale: float):
        super().__init__()
        self.net = TimeConditionedMLP(event_shape, hidden, time_scale=time_scale, out_dim=math.prod(event_shape))

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        return self.net(x, s).reshape(x.shape)


class StationaryReference(nn.Module):
    """The reference SDE's exact score (no parameters): the chain that keeps ``N(0, std^2 I)``."""

    def __init__(self, process: StationaryOUProcess):
        super().__init__()
        self.process = process

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        return self.process.stationary_score(x)


class ELEGANT(RewardBackprop):
    extendable = False  # its stages are shares of `iterations`: more would move their boundaries

    def __init__(self, *args, kl_weight: float, iterations: int, value_fraction: float = 0.2,
                 initial_fraction: float = 0.2, initial_steps: int = 10, initial_T: float = 1.0,
                 value_hidden: Sequence[int] = (256, 256), value_lr: float = 1e-3, initial_lr: float = 1e-3,
                 value_target: str = "mean", value_continuations: int = 64, initial_network: str = "copy",
                 initial_hidden: Sequence[int] = (256, 256), **kw):
        if kl_weight <= 0:
            raise ValueError(f"method.kl_weight (ELEGANT's alpha) must be > 0 (got {kl_weight}); 0 is method=nokl")
        if value_target not in ("mean", "soft"):
            raise ValueError(f"method.value_target must be mean | soft (got {value_target!r})")
        if value_continuations < 1:
            raise ValueError(f"method.value_continuations must be >= 1 (got {value_continuations})")
        # value_fraction 0 = no value stage, allowed only without the initial stage that reads it
        # (the drift stage alone: the authors' public image code)
        if not (0 <= value_fraction and 0 <= initial_fraction and value_fraction + initial_fraction < 1
                and (value_fraction > 0 or initial_fraction == 0)):
            raise ValueError("method.value_fraction >= 0, method.initial_fraction >= 0, their sum < 1 and "
                             "value_fraction > 0 when initial_fraction > 0 required "
                             f"(got {value_fraction}, {initial_fraction})")
        if initial_network not in ("copy", "small"):
            raise ValueError(f"method.initial_network must be copy or small (got {initial_network!r})")
        backbone = args[0] if args else kw.get("backbone")
        if initial_fraction > 0 and initial_network == "copy" and not getattr(backbone, "copyable", True):
            raise ValueError(f"method.initial_network=copy would deep-copy {type(backbone).__name__}: use "
                             "+method.initial_network=small, or method.initial_fraction=0 method.value_fraction=0 "
                             "(the drift stage alone, as the authors' public image code)")
        kw.setdefault("grad_window", {"kind": "all"})  # stage 3 backpropagates through the whole chain
        super().__init__(*args, iterations=iterations, reward_weight=1.0, kl_weight=kl_weight, **kw)
        # stage budgets: shares of `iterations`, at least one iteration each (drift gets the rest)
        n_value = max(1, round(value_fraction * iterations)) if value_fraction > 0 else 0
        n_initial = max(1, round(initial_fraction * iterations)) if initial_fraction > 0 else 0
        if iterations > 0 and n_value + n_initial >= iterations:
            raise ValueError(f"method.iterations={iterations} leaves no drift-control iterations after "
                             f"{n_value} value and {n_initial} initial-distribution iterations")
        self.alpha = kl_weight  # ELEGANT's alpha
        self.phase_ends = (n_value, n_value + n_initial, self.iterations)
        self.value_lr, self.initial_lr = value_lr, initial_lr
        self.value_target, self.value_continuations = value_target, value_continuations
        # only the stages that run get networks (a drift-only run on a UNet builds none)
        self.value_net = FlatMLP(self.backbone.event_shape, value_hidden) if n_value else None  # v(x_0) -> [B]
        _, prior_std = self.sampler.process.marginal_coeffs(torch.tensor(self.sampler.process.T))
        init_process = StationaryOUProcess(T=initial_T, std=float(prior_std))
        self.initial_sampler = EulerMaruyama(init_process, initial_steps)
        self.initial_control = None
        if n_initial:
            # the pretrained network as the initial control's start (vectors, sequences), or a
            # small MLP (images: a UNet is never copied)
            net = (copy.deepcopy(self.backbone) if initial_network == "copy" else
                   SmallScoreNet(self.backbone.event_shape, initial_hidden, self.sampler.process.time_scale))
            self.initial_control = InitialControl(net, init_process)
        self.initial_reference = StationaryReference(init_process)
        # which iteration we are at, saved in checkpoints: a resumed run re-enters its stage
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def phase(self) -> str:
        i = int(self.iteration)
        return next(p for p, end in zip(PHASES, self.phase_ends) if i < end) if i < self.iterations else "drift"

    @property
    def learns_initial(self) -> bool:
        return self.phase_ends[1] > self.phase_ends[0]

    def configure_optimizers(self):
        optimisers = [self.build_policy_optimizer()]
        if self.value_net is not None:
            optimisers.append(torch.optim.Adam(self.value_net.parameters(), lr=self.value_lr))
        if self.initial_control is not None:
            optimisers.append(torch.optim.Adam(self.initial_control.parameters(), lr=self.initial_lr))
        return optimisers

    def stage_optimizers(self) -> tuple:
        """``(drift, value, initial)``, ``None`` for a stage that does not run."""
        opts = self.optimizers()
        opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        drift = opts.pop(0)
        value = opts.pop(0) if self.value_net is not None else None
        initial = opts.pop(0) if self.initial_control is not None else None
        return drift, value, initial

    # --- the learned initial distribution ------------------------------------------------
    def initial_rollout(self, n: int, generator: torch.Generator, grad: bool = False):
        with torch.set_grad_enabled(grad):
            return self.initial_sampler.rollout(
                self.initial_control, n, generator=generator, event_shape=self.backbone.event_shape,
                reference=self.initial_reference, grad_window=GradWindow("all") if grad else None,
                device=self.device)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond=None) -> Generation:
        """The stage-2 chain draws the start, the fine-tuned chain runs from it; KL-Div adds
        both path KLs (without stage 2: the prior start, ``kl_path`` alone)."""
        if not self.learns_initial:
            return super().generate(n, generator, cond)
        init = self.initial_rollout(n, generator)
        if cond is None:  # the prompts of a text-to-image run (the initial chain reads none)
            cond = self.condition_source.sample(n, generator, generator.device, split="eval")
        traj = self.sampler.rollout(self.eval_policy(), generator=generator, x_init=init.final, cond=cond,
                                    reference=self.reference)
        return Generation(traj.final, {"kl_path": traj.path_kl(), "kl_init": init.path_kl()})

    def value_targets(self, traj) -> Tensor:
        """Stage 1's regression targets for the starts ``traj.states[0]`` of pretrained chains:
        their reward (``mean``) or the soft value of ``value_continuations`` fresh pretrained
        continuations of each start (``soft``; log-mean-exp, stable for small alpha)."""
        if self.value_target == "mean":
            return self.reward_of_state(traj.final)  # the reward stage 3 maximises (relaxed state)
        starts = traj.states[0].repeat_interleave(self.value_continuations, dim=0)
        rows = torch.arange(len(traj.final)).repeat_interleave(self.value_continuations)
        cont = self.rollout(self.reference, with_reference=False, x_init=starts, cond=index_cond(traj.cond, rows))
        rewards = self.reward_of_state(cont.final).view(-1, self.value_continuations) / self.alpha
        self._last_final = traj.final.detach()  # the iteration's curves: its own batch, not the continuations
        return self.alpha * (torch.logsumexp(rewards, dim=1) - math.log(self.value_continuations))

    # --- one iteration ---------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        phase = self.phase
        self.iteration += 1
        drift_opt, value_opt, initial_opt = self.stage_optimizers()
        if phase == "value":
            traj = self.rollout(self.reference, with_reference=False)
            with torch.no_grad():
                target = self.value_targets(traj)
            pred = self.value_net(traj.states[0])
            loss = ((pred - target) ** 2).mean()
            self.optimiser_step(loss, value_opt)
            explained = 1 - loss.detach() / target.var().clamp_min(1e-12)
            return {"phase": 0, "value_loss": loss.detach(), "value_explained_variance": explained,
                    "reward": target.mean()}
        if phase == "initial":
            self.value_net.requires_grad_(False)
            traj = self.initial_rollout(self.batch_size, self.generator, grad=True)
            value, kl = self.value_net(traj.final), traj.path_kl()
            loss = -(value - self.alpha * kl).mean()
            self.optimiser_step(loss, initial_opt)
            return {"phase": 1, "initial_value": value.detach().mean(), "kl_init": kl.detach().mean(),
                    "initial_gain": self.initial_control.gain.detach()}
        x_init = kl_init = None
        if self.learns_initial:
            with torch.no_grad():
                init = self.initial_rollout(self.batch_size, self.generator)
            x_init, kl_init = init.final, init.path_kl().mean()
        logs = self.backprop_step(x_init, drift_opt)
        logs["phase"] = 2
        if kl_init is not None:
            logs["kl_init"] = kl_init
        return logs
