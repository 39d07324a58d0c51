"""The base class every fine-tuning method extends.

A method owns a trainable backbone, a frozen copy of it (the pretrained reference), the
sampler, the reward and a ``torch.Generator``; it overrides ``update()`` (one iteration:
rollouts, losses, optimiser steps) and, when it trains more than the backbone,
``configure_optimizers``. Lightning provides the loop, checkpointing and loggers; we use
manual optimisation because one iteration may take several optimiser steps (PPO epochs,
actor and critic).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..core.conditioning import ConditionSource
from ..core.samplers import GradWindow, Sampler
from ..core.trajectory import Generation, Trajectory
from ..evaluation.diversity import mean_pairwise_levenshtein
from ..rewards.base import Reward
from ..distributed import mean_of_logs, sync_gradients
from ..seeding import chain_seed, derive_seed


class DivergenceError(ValueError):
    """A non-finite loss or metric: the run stops (a number of a diverged run is no result)."""


class _Iterations(torch.utils.data.IterableDataset):
    """A "dataset" of iteration indices: rollouts generate their own data. Iterable, so that
    under DDP Lightning adds no ``DistributedSampler``: that would split the indices between
    the ranks and run ``iterations / world_size`` iterations; every rank runs all of them."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(range(self.n))


class FineTuneMethod(L.LightningModule):
    # Capability flags: what a method needs from the rest of the run. Validation reads them
    # from this source without importing it (``validation.class_flags``), so they must stay
    # literal class attributes; the tests read them instead of keeping lists of methods.
    #: whether training changes the backbone (False: the pretrained model, guidance)
    fine_tunes: bool = True
    #: whether the loss backpropagates through the reward (it must be ``differentiable``)
    needs_differentiable_reward: bool = False
    #: whether the method needs log-probabilities of the chain's steps (a stochastic sampler)
    needs_stochastic_sampler: bool = False
    #: the datasets' ``sample_kind`` the method can fine-tune on
    sample_kinds: tuple[str, ...] = ("vectors", "tokens", "images")
    #: the overrides a method needs besides ``method=<name>`` to run at all (a bench-only
    #: method's dataset); the end-to-end tests run it with them
    example_overrides: tuple[str, ...] = ()
    #: whether a finished run may be continued with more ``iterations`` (run_folder.py); False
    #: where stages are shares of the budget (ELEGANT), which more iterations would move
    extendable: bool = True

    def __init__(self, backbone: Backbone, sampler: Sampler, reward: Reward, *, iterations: int,
                 batch_size: int, lr: float, seed: int = 0, iterations_per_epoch: int = 50,
                 grad_window: dict | None = None, checkpoint_steps: bool = False, dataset=None,
                 max_grad_norm: float | None = None, true_reward: Reward | None = None,
                 condition_source: ConditionSource | None = None, lr_decay_at: float | None = None,
                 lr_decay_factor: float = 0.1, weight_decay: float = 0.0):
        super().__init__()
        for key, v in (("iterations", iterations), ("batch_size", batch_size), ("iterations_per_epoch", iterations_per_epoch)):
            if v < 0 or (v == 0 and key != "iterations"):
                raise ValueError(f"method.{key} must be > 0 (got {v})")
        if lr <= 0:
            raise ValueError(f"method.lr must be > 0 (got {lr})")
        # the CLI rejects these pairs before any compute (validation.py); this guards direct use
        if self.needs_differentiable_reward and not getattr(reward, "differentiable", False):
            raise ValueError(f"{type(self).__name__} needs a differentiable reward ({type(reward).__name__} is not)")
        if self.needs_stochastic_sampler and not sampler.stochastic:
            raise ValueError(f"{type(self).__name__} needs a stochastic sampler ({type(sampler).__name__} is deterministic here)")
        if lr_decay_at is not None and not 0 <= lr_decay_at <= 1:
            raise ValueError(f"method.lr_decay_at must be a fraction in [0, 1] or null (got {lr_decay_at})")
        if lr_decay_factor <= 0:
            raise ValueError(f"method.lr_decay_factor must be > 0 (got {lr_decay_factor})")
        if weight_decay < 0:
            raise ValueError(f"method.weight_decay must be >= 0 (got {weight_decay})")
        self.lr_decay_at, self.lr_decay_factor = lr_decay_at, lr_decay_factor
        self.weight_decay = float(weight_decay)
        self.automatic_optimization = False
        self.backbone = backbone
        self.reference = backbone.frozen_reference()
        self.sampler, self.reward, self.dataset = sampler, reward, dataset
        self.iterations, self.batch_size, self.lr = iterations, batch_size, lr
        self.iterations_per_epoch = min(iterations_per_epoch, max(iterations, 1))
        self.grad_window = GradWindow(**(grad_window or {}))
        self.checkpoint_steps = checkpoint_steps
        self.max_grad_norm = max_grad_norm
        # prompts for text-to-image backbones; the unconditional tasks draw nothing
        self.condition_source = condition_source or backbone.condition_source()
        self.seed = seed
        # sequences decode through their task (GFP states are differences from the wild type)
        self.decode = getattr(dataset, "decode", None) or backbone.decode
        self._true_reward = true_reward  # the genuine reward r (training curves), where known
        self._last_final: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._data_generator: torch.Generator | None = None
        self._pending_states: dict[str, Tensor | None] = {}
        # memory a method's updates hold for backward (the tutorial's "memory efficiency"):
        # bytes of the tensors autograd saved since the last backward, and their peak over the run
        self._saved_bytes = 0
        self.saved_for_backward_peak = 0
        # rows the reward scored (training and sampling): the budget of a black-box reward; and
        # rows a reward gradient was backpropagated through (the tutorial's "needs a
        # differentiable reward", measured: zero for a method that only queries it)
        self.reward_queries = 0
        self.reward_gradient_rows = 0
        if isinstance(reward, torch.nn.Module):
            reward.register_forward_hook(self._count_queries)
        # names of the parameters an optimiser stepped (the tutorial's "needs a value
        # function", measured: parameters trained beside the policy's)
        self.stepped_parameter_names: set[str] = set()

    # --- randomness ------------------------------------------------------------------------
    # One rule for the whole project: chain noise (prior draws, transition noise, anything
    # shaped like the chain's tensors) comes from ``generator``, which lives on the module's
    # device; draws made on the CPU — data-set rows, random-K windows, index sets — come from
    # ``data_generator``, always a CPU generator. Torch refuses a CUDA generator for a CPU
    # draw (and vice versa), so mixing them would work on the CPU and fail on a GPU. Both
    # depend on the rank (under DDP every process simulates different chains: seeding.py) and
    # are saved in checkpoints, each rank's own, so a resumed run continues every stream.
    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(chain_seed(self.seed, self.global_rank))
            self._restore("generator_state", self._generator)
        return self._generator

    @property
    def data_generator(self) -> torch.Generator:
        if self._data_generator is None:
            self._data_generator = torch.Generator().manual_seed(derive_seed(self.seed, "data", self.global_rank))
            self._restore("data_generator_state", self._data_generator)
        return self._data_generator

    def _restore(self, key: str, generator: torch.Generator) -> None:
        """A checkpointed stream: this rank's (a DDP checkpoint holds one per rank); a state
        saved by a run on another number of ranks is taken by rank 0 only (the others would
        replay rank 0's chains), the other ranks start their streams afresh."""
        by_rank = self._pending_states.get(key + "s_by_rank")
        if by_rank is not None and len(by_rank) == self.world_size():
            generator.set_state(by_rank[self.global_rank].clone())
        elif self._pending_states.get(key) is not None and self.global_rank == 0:
            generator.set_state(self._pending_states[key])

    def weights_from_source_keys(self) -> list[str]:
        """state_dict keys that a checkpoint leaves out: the weights of a component that loads
        them from its own files (``weights_from_source``: Stable Diffusion, CLIP) and that
        fine-tuning does not train — a 3.4 GB UNet is not copied into every ``last.ckpt``."""
        keys = []
        for name, module in self.named_children():
            if getattr(module, "weights_from_source", False):
                trained = {n for n, p in module.named_parameters() if p.requires_grad}
                keys += [f"{name}.{k}" for k in module.state_dict() if k not in trained]
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key in self.weights_from_source_keys():
            checkpoint["state_dict"].pop(key, None)
        checkpoint["saved_for_backward_peak"] = self.saved_for_backward_peak
        checkpoint["reward_queries"] = self.reward_queries
        checkpoint["reward_gradient_rows"] = self.reward_gradient_rows
        checkpoint["stepped_parameter_names"] = sorted(self.stepped_parameter_names)
        # rank 0's streams (what a single-process run reads) and, under DDP, every rank's
        # (each rank writes the same checkpoint dict; rank 0's is the one saved)
        for key, generator in (("generator_state", self.generator), ("data_generator_state", self.data_generator)):
            checkpoint[key] = generator.get_state()
            if self.world_size() > 1:
                strategy = self.trainer.strategy  # NCCL gathers device tensors only
                checkpoint[key + "s_by_rank"] = strategy.all_gather(generator.get_state().to(strategy.root_device)).cpu()
        # no global stream to save: fine-tuning never draws from it (runner.py's no_global_draws)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # (Lightning calls this before loading the state_dict) the weights a checkpoint left
        # out are this module's own, loaded from their source: strict loading still checks the rest
        own = self.state_dict()
        for key in self.weights_from_source_keys():
            checkpoint["state_dict"].setdefault(key, own[key])
        self.saved_for_backward_peak = int(checkpoint.get("saved_for_backward_peak", 0))
        self.reward_queries = int(checkpoint.get("reward_queries", 0))
        self.reward_gradient_rows = int(checkpoint.get("reward_gradient_rows", 0))
        self.stepped_parameter_names = set(checkpoint.get("stepped_parameter_names", []))
        self._pending_states = {k: checkpoint.get(k) for k in ("generator_state", "data_generator_state",
                                                               "generator_states_by_rank", "data_generator_states_by_rank")}
        self._generator = self._data_generator = None

    # --- what subclasses use -----------------------------------------------------------
    @property
    def epochs(self) -> int:
        return -(-self.iterations // self.iterations_per_epoch)

    def rollout(self, policy=None, *, with_reference: bool = True, grad: bool = False, batch_size: int | None = None,
                **kw) -> Trajectory:
        """A batch of chains (``batch_size``, default the method's) from the current backbone
        (or ``policy``), recording KL to the pretrained chain; gradients flow through the
        configured window when ``grad``."""
        n = batch_size or self.batch_size
        if "cond" not in kw:
            kw["cond"] = self.condition_source.sample(n, self.data_generator, self.device)
        with torch.set_grad_enabled(grad):
            traj = self.sampler.rollout(
                policy or self.backbone, n, generator=self.generator,
                event_shape=self.backbone.event_shape, reference=self.reference if with_reference else None,
                grad_window=self.grad_window if grad else None, window_generator=self.data_generator,
                checkpoint_steps=self.checkpoint_steps, device=self.device, **kw)
        self._last_final = traj.final.detach()
        return traj

    def score_samples(self, x: Tensor) -> Tensor:
        """r_hat of final states as the evaluation scores them (decoded: tokens, pixels)."""
        return self.reward(self.decode(x))

    def reward_of_state(self, x: Tensor) -> Tensor:
        """r_hat read from a state differentiably (the relaxed one-hot sequence itself; a
        latent model's decoded pixels): what reward gradients flow through."""
        return self.reward(self.backbone.render(x))

    @torch.no_grad()
    def sample_stats(self, final: Tensor) -> dict[str, float]:
        """Curves beside the method's own logs, from the iteration's last rollout: the
        genuine reward where known and, for sequences, the batch's Levenshtein diversity."""
        decoded = self.decode(final)
        stats = {}
        if self._true_reward is not None:
            stats["reward_true"] = float(self._true_reward.to(final.device)(decoded).mean())
        if not decoded.is_floating_point() and decoded.dim() == 2:
            stats["diversity"] = mean_pairwise_levenshtein(decoded, workers=1)
        return stats

    def optimiser_step(self, loss: Tensor, optimiser=None) -> None:
        opt = optimiser or self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_and_step(opt)

    def clip_and_step(self, opt) -> None:
        """Under DDP the ranks' mean gradient (distributed.py: once per step, whatever the
        number of backwards before it), then gradient-norm clipping (``max_grad_norm``, of
        that mean) and the step."""
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.world_size() > 1:
            self.sync_gradients(params)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        stepped = {id(p) for g in opt.param_groups for p in g["params"] if p.grad is not None}
        self.stepped_parameter_names.update(n for n, p in self.named_parameters() if id(p) in stepped)
        opt.step()

    # --- data parallelism (trainer=ddp; distributed.py) --------------------------------------
    def world_size(self) -> int:
        """Processes training this module together (1 outside a DDP fit)."""
        return 1 if self._trainer is None else self._trainer.world_size

    def mean_over_ranks(self, tensor: Tensor) -> Tensor:
        """The ranks' mean of ``tensor`` (a collective: every rank calls it), on the tensor's
        device. It travels on the strategy's device: NCCL reduces CUDA tensors only, and after
        the fit Lightning has moved the module to the CPU."""
        strategy = self.trainer.strategy
        return strategy.reduce(tensor.to(strategy.root_device), reduce_op="mean").to(tensor.device)

    def sync_gradients(self, params) -> None:
        sync_gradients(params, self.mean_over_ranks)

    def training_costs(self) -> dict[str, int]:
        """Reward queries and reward-gradient rows of the whole fit (summed over the ranks) and
        the peak bytes saved for one backward (one rank's); a collective under DDP."""
        costs = {"reward_queries": self.reward_queries, "reward_gradient_rows": self.reward_gradient_rows}
        if self.world_size() > 1:
            total = self.mean_over_ranks(torch.tensor(list(costs.values()), dtype=torch.float64, device=self.device))
            costs = {k: round(float(v) * self.world_size()) for k, v in zip(costs, total)}
        return {**costs, "saved_for_backward_peak": self.saved_for_backward_peak}

    def update(self) -> dict[str, float]:  # pragma: no cover
        """One iteration; returns scalars to log (``reward``, ``kl_path``, losses, …)."""
        raise NotImplementedError

    def eval_policy(self):
        """The policy the default :meth:`generate` samples from (the fine-tuned backbone)."""
        return self.backbone

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond: Any = None) -> Generation:
        """``n`` samples of the fine-tuned model, with their KL to the pretrained one — the
        only thing the shared evaluation asks of a method. Default: one rollout of
        :meth:`eval_policy` on the configured sampler. Methods that are not one chain
        (ELEGANT's two chains, particle samplers, value-guided sampling) override it."""
        return self.generate_with(self.eval_policy(), n, generator, cond)

    @torch.no_grad()
    def generate_with(self, policy, n: int, generator: torch.Generator, cond: Any = None,
                      path_kl: bool = True) -> Generation:
        """One evaluation rollout of ``policy`` (conditions drawn from the evaluation split when
        none are given); ``path_kl=False`` leaves the path KL out of the generation (a policy
        whose path KL to the reference the step formula does not give)."""
        if cond is None:
            cond = self.condition_source.sample(n, generator, generator.device, split="eval")
        traj = self.sampler.rollout(policy, n, generator=generator, event_shape=self.backbone.event_shape,
                                    cond=cond, reference=self.reference if path_kl else None, device=generator.device)
        return Generation(traj.final, {"kl_path": traj.path_kl()} if path_kl else {})

    def extra_metrics(self) -> dict[str, float]:
        """Numbers the method knows without sampling (the exact optimum's expectations), written
        into ``metrics.json`` beside the shared evaluation's."""
        return {}

    # --- Lightning plumbing ----------------------------------------------------------------
    def build_policy_optimizer(self) -> torch.optim.Optimizer:
        """The fine-tuned weights' optimiser: Adam, or AdamW (decoupled decay) with a
        ``weight_decay`` (ELEGANT's image experiment: AdamW, 0.1 in the public code)."""
        params = self.backbone.trainable_parameters()
        if self.weight_decay > 0:
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr)

    def configure_optimizers(self):
        return self.build_policy_optimizer()

    def train_dataloader(self):
        # a generator of its own: without one every epoch's iterator draws a seed from the global RNG
        return torch.utils.data.DataLoader(_Iterations(self.iterations_per_epoch), batch_size=None,
                                           generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader")))

    def manual_backward(self, loss: Tensor, *args, **kw) -> None:
        self.saved_for_backward_peak = max(self.saved_for_backward_peak, self._saved_bytes)
        self._saved_bytes = 0  # the graph is freed by this backward
        super().manual_backward(loss, *args, **kw)

    def _count_queries(self, module, args, output) -> None:
        if not (args and torch.is_tensor(args[0])):
            return
        rows = int(args[0].shape[0])
        self.reward_queries += rows
        if torch.is_tensor(output) and output.requires_grad:  # counted when a backward reaches it
            output.register_hook(lambda grad: self._count_reward_gradient(rows))

    def _count_reward_gradient(self, rows: int) -> None:
        self.reward_gradient_rows += rows

    def trained_parameter_counts(self) -> dict[str, int]:
        """Parameters the run's optimisers stepped: the policy's (the backbone) and the rest
        (value networks, critics, classifiers, ELEGANT's initial control)."""
        sizes = dict(self.named_parameters())
        policy = sum(sizes[n].numel() for n in self.stepped_parameter_names if n.startswith("backbone."))
        other = sum(sizes[n].numel() for n in self.stepped_parameter_names if not n.startswith("backbone."))
        return {"policy": policy, "auxiliary": other}

    def _count_saved(self, tensor: Tensor) -> Tensor:
        self._saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def apply_lr_schedule(self, iteration: int) -> None:
        """Set every optimiser's rate for ``iteration`` (0-based) from its initial rate: a
        function of the iteration alone, so a resumed run continues the same schedule."""
        if self.lr_decay_at is None:
            return
        factor = self.lr_decay_factor if iteration >= self.lr_decay_at * self.iterations else 1.0
        optimisers = self.optimizers()
        for opt in optimisers if isinstance(optimisers, (list, tuple)) else [optimisers]:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor

    def training_step(self, batch, batch_idx):
        self.apply_lr_schedule(self.current_epoch * self.iterations_per_epoch + batch_idx)
        self.backbone.train()
        self._last_final = None
        self._saved_bytes = 0
        # counts every tensor saved for backward (an upper bound: a tensor saved by two ops counts twice)
        with torch.autograd.graph.saved_tensors_hooks(self._count_saved, lambda tensor: tensor):
            logs = self.update()
        if self._last_final is not None:
            logs.update(self.sample_stats(self._last_final))
        logs = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}
        if self.world_size() > 1:  # the curves are of all ranks' chains, not rank 0's
            logs = mean_of_logs(logs, self.mean_over_ranks, self.device)
        diverged = [k for k, v in logs.items() if not math.isfinite(v)]
        if diverged:
            raise DivergenceError(
                f"the run diverged at iteration {batch_idx + 1 + self.current_epoch * self.iterations_per_epoch}: "
                + ", ".join(f"{k} = {float(logs[k])}" for k in diverged)
                + " (lower method.lr, or clip with method.max_grad_norm); no metrics.json was written")
        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, on_step=True, on_epoch=False,
                      prog_bar=False, batch_size=self.batch_size)
