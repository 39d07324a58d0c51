"""Data-parallel fine-tuning (``trainer=ddp``): one process per device, each simulating its own
chains, gradients averaged before every optimiser step.

Why not Lightning's stock DDP wrapper: the fine-tuning methods optimise by hand, with several
backwards per step (PPO minibatches, ``steps_per_backward`` chunks) and several optimisers
whose backwards touch disjoint parameters (a policy and its critic). DDP's reducer syncs per
backward and expects every registered parameter in each one: CTRL's critic step fails with
"parameters that were not used in producing the loss", and whether an accumulated gradient is
averaged once or per backward depends on the reducer's state. Here the method averages
``p.grad`` of the optimiser it is about to step, once, after all of that step's backwards
(``FineTuneMethod.clip_and_step``), so every method is covered by one code path and a
parameter trained beside the policy is averaged exactly like the policy's. Modules with
automatic optimisation keep the stock DDP wrapper.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor


class ManualSyncDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves a manual-optimisation module unwrapped (its gradients are
    averaged by the module itself, see the module docstring); the ranks start from rank 0's
    weights and buffers, as under the DDP wrapper."""

    def configure_ddp(self) -> None:
        if self.lightning_module.automatic_optimization:
            super().configure_ddp()
            return
        _sync_module_states(self.model)


def sync_gradients(params: Iterable[Tensor], mean: Callable[[Tensor], Tensor]) -> None:
    """Replace each ``p.grad`` by its mean over the ranks, in one collective (``mean``).

    A rank whose loss did not reach ``p`` (``grad is None``) contributes zeros — the gradient
    of the mean of the ranks' losses, as DDP defines it; a parameter no rank has a gradient
    for stays ``None``, so the optimiser skips it on every rank alike."""
    params = list(params)
    if not params:
        return
    dtype = params[0].dtype
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    has = [p.grad is not None for p in params]
    flat = [p.grad.reshape(-1).to(dtype) if p.grad is not None else p.new_zeros(p.numel(), dtype=dtype)
            for p in params]
    device = params[0].device
    mask = torch.tensor(has, dtype=dtype, device=device)
    reduced = mean(torch.cat([*flat, mask]))
    grads, seen = reduced[:-len(params)], reduced[-len(params):]
    offset = 0
    for p, present in zip(params, seen.tolist()):
        n = p.numel()
        if present > 0:
            p.grad = grads[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def mean_of_logs(logs: dict[str, float], mean: Callable[[Tensor], Tensor], device) -> dict[str, float]:
    """The ranks' mean of each logged scalar (every rank logs the same keys: the same code
    runs on each). A non-finite value on one rank makes the mean non-finite on all, so the
    divergence check stops every rank together instead of leaving the others waiting."""
    keys = sorted(logs)
    values = mean(torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device))
    return dict(zip(keys, values.tolist()))
