"""Learned and exact rewards for one-hot sequences (ELEGANT §8.1–8.2, App. F.1).

* :class:`MLPOracle` — the oracle network of ELEGANT Table 5 for TFBind8.
* :class:`OracleRegression` — fits an oracle network on ``(tokens, y)`` with MSE + Adam on
  a seeded random half of the data, reporting R² on the other half.
* :class:`OracleReward` — a trained oracle as the *nominal* reward ``r_hat`` (differentiable).
* :class:`ExactLookupReward` — design-bench's exact TFBind8 table as the *genuine* reward ``r``.

ELEGANT App. F.1.1: "We use half of the dataset to construct a learned reward to make a
scenario where oracles are imperfect." §8.2 then compares ``r_hat`` with the genuine ``r``
(known for TFBind8) to measure over-optimisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from ..cache import cached_network
from ..data.sequences import SequenceData, one_hot
from ..data.tfbind8 import TFBind8ExactLookup
from ..logs import ProgressLines
from ..nets import mlp
from .base import Reward

__all__ = ["MLPOracle", "OracleRegression", "OracleReward", "ExactLookupReward", "trained_oracle"]

log = logging.getLogger(__name__)


class MLPOracle(nn.Module):
    """ELEGANT Table 5: ``flatten(x [B, L, V]) -> (Linear, ReLU) x 3 -> Linear -> Sigmoid -> [B]``.

    The extracted Table 5 lists ``1 Linear, 1 ReLU, 2 Linear, 2 ReLU, 3 Linear, 3 ReLU,
    4 Sigmoid`` and loses every dimension. Read literally (third Linear to width 1, ReLU,
    Sigmoid) the output would be confined to ``[0.5, 1)``, which cannot fit TFBind8's
    min-max-normalised y in ``[0, 1]``; we read layer 4 as the output layer
    ``Linear(hidden, 1)`` + Sigmoid, i.e. three hidden ``Linear + ReLU`` blocks. The hidden
    width (unreadable) defaults to 256. ``output_activation=None`` drops the Sigmoid (for
    targets outside ``[0, 1]``).

    The input may be exact one-hot rows or any relaxed ``[B, L, V]`` point (a diffusion state),
    so the oracle is differentiable in its input; ``LongTensor [B, L]`` tokens are one-hot
    encoded first.
    """

    def __init__(self, length: int, vocab_size: int, hidden: Sequence[int] = (256, 256, 256),
                 output_activation: str | None = "sigmoid"):
        super().__init__()
        if output_activation not in (None, "sigmoid"):
            raise ValueError(f"oracle.output_activation must be 'sigmoid' or None (got {output_activation!r})")
        self.length, self.vocab_size = int(length), int(vocab_size)
        self.net = mlp(self.length * self.vocab_size, hidden, 1, "relu", output_activation)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            x = one_hot(x, self.vocab_size)
        if x.shape[-2:] != (self.length, self.vocab_size):
            raise ValueError(f"expected [B, {self.length}, {self.vocab_size}] input, got {tuple(x.shape)}")
        x = x.to(next(self.parameters()).dtype)
        return self.net(x.flatten(-2)).squeeze(-1)


class OracleRegression(L.LightningModule):
    """Fit ``net`` (one-hot ``[B, L, V]`` -> ``[B]``) to ``y`` by MSE with Adam.

    The rows are split once, by a ``torch.Generator`` seeded with ``seed`` (no global seeding),
    into a training part (``train_fraction``, default one half as in ELEGANT F.1.1) and a
    held-out part. Logs ``oracle/train_mse`` every step and ``oracle/heldout_r2`` (R² =
    ``1 - SS_res / SS_tot`` over the *whole* held-out part, accumulated in float64 across
    validation batches) after every validation epoch. Run it with a plain
    ``lightning.Trainer(max_epochs=...)``; :meth:`heldout_r2` evaluates without a Trainer.

    Args:
        net: the oracle network, e.g. :class:`MLPOracle`.
        tokens: ``LongTensor [N, L]``.
        y: ``FloatTensor [N]``.
        vocab_size: ``V`` for the one-hot encoding.
        train_fraction: share of rows in the training part.
        batch_size, lr, weight_decay: Adam mini-batch regression settings.
        seed: seeds the split and the training loader's shuffling.
    """

    def __init__(self, net: nn.Module, tokens: Tensor, y: Tensor, vocab_size: int, *,
                 train_fraction: float = 0.5, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0):
        super().__init__()
        if tokens.ndim != 2 or y.shape != tokens.shape[:1]:
            raise ValueError(f"oracle data must be tokens [N, L] and y [N] (got {tuple(tokens.shape)}, {tuple(y.shape)})")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"oracle.train_fraction must be in (0, 1) (got {train_fraction})")
        if batch_size <= 0 or lr <= 0 or weight_decay < 0:
            raise ValueError("oracle.batch_size > 0, oracle.lr > 0 and oracle.weight_decay >= 0 required")
        self.save_hyperparameters(ignore=["net", "tokens", "y"])
        self.net = net
        self.vocab_size, self.batch_size, self.lr, self.weight_decay, self.seed = (
            int(vocab_size), int(batch_size), float(lr), float(weight_decay), int(seed))
        n = tokens.shape[0]
        n_train = int(round(train_fraction * n))
        if not 0 < n_train < n:
            raise ValueError(f"oracle split of {n} rows with train_fraction={train_fraction} leaves a part empty")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        self.train_index, self.heldout_index = perm[:n_train], perm[n_train:]
        self.tokens, self.y = tokens.long(), y.float()
        self._val_sums: Tensor | None = None

    # --- data ------------------------------------------------------------------------
    def _dataset(self, index: Tensor) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.tokens[index], self.y[index])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            self._dataset(self.train_index), batch_size=self.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(self.seed + 1))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self._dataset(self.heldout_index), batch_size=max(self.batch_size, 4096),
                                           generator=torch.Generator().manual_seed(self.seed + 2))  # not the global RNG

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # --- steps -----------------------------------------------------------------------
    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(one_hot(tokens, self.vocab_size))

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        loss = torch.nn.functional.mse_loss(self(tokens), y)
        self.log("oracle/train_mse", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        tokens, y = batch
        self._val_sums += _r2_sums(self(tokens), y)

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is not None and self._val_sums[0] > 1:
            self.log("oracle/heldout_r2", _r2_from_sums(self._val_sums).float(), prog_bar=True)
        self._val_sums = None

    @torch.no_grad()
    def heldout_r2(self, chunk: int = 65536) -> float:
        """R² of ``net`` on the held-out part, without a Trainer."""
        return r2_score(self.net, self.tokens[self.heldout_index], self.y[self.heldout_index], self.vocab_size, chunk)


def _r2_sums(pred: Tensor, y: Tensor) -> Tensor:
    """``[n, sum y, sum y^2, sum (y - pred)^2]`` in float64 (mergeable across batches)."""
    y, pred = y.double(), pred.double()
    return torch.stack([torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device),
                        y.sum(), (y**2).sum(), ((y - pred) ** 2).sum()])


def _r2_from_sums(sums: Tensor) -> Tensor:
    n, sy, syy, sse = sums
    ss_tot = syy - sy**2 / n
    return 1.0 - sse / ss_tot


class OracleReward(Reward):
    """A trained oracle network as the nominal reward ``r_hat`` (frozen, differentiable in x).

    * Float input ``[B, L, V]`` is fed to the network *as is*: a fine-tuning method that
      back-propagates the reward (ELEGANT, NO-KL, truncation, random-K) calls it on the
      relaxed final state ``x`` of the chain, so gradients reach ``x``.
    * ``LongTensor [B, L]`` tokens (what :meth:`SequenceTransformerBackbone.decode` returns)
      are one-hot encoded: this is the evaluation path, ``r_hat(one_hot(argmax x))``.
      :meth:`hard` does the same from a relaxed state.

    The network's weights are frozen (``requires_grad=False``, eval mode).
    """

    differentiable = True

    def __init__(self, net: nn.Module, vocab_size: int, offset: Tensor | None = None):
        super().__init__()
        self.net = net.eval()
        self.net.requires_grad_(False)
        self.vocab_size = int(vocab_size)
        # states measured from a reference sequence (GFP's difference representation) are
        # shifted back to one-hot coordinates before the network reads them
        self.register_buffer("offset", offset, persistent=False)

    def train(self, mode: bool = True) -> "OracleReward":
        super().train(mode)
        self.net.eval()  # a frozen oracle never switches to training behaviour
        return self

    def forward(self, x: Tensor, cond=None) -> Tensor:
        if not x.is_floating_point():
            return self.net(one_hot(x, self.vocab_size).to(self._dtype))
        return self.net(x if self.offset is None else x + self.offset)

    @property
    def _dtype(self):
        return next(self.net.parameters()).dtype

    def hard(self, x: Tensor) -> Tensor:
        """``r_hat(one_hot(argmax x))`` for a relaxed state ``[B, L, V]`` (no gradient to x)."""
        if self.offset is not None:
            x = x + self.offset
        return self.net(one_hot(x.argmax(dim=-1), self.vocab_size))


class ExactLookupReward(Reward):
    """The genuine TFBind8 reward: design-bench's exact table (:class:`TFBind8ExactLookup`).

    Takes tokens ``LongTensor [B, 8]`` or a relaxed one-hot ``[B, 8, 4]`` (decoded by argmax);
    returns ``FloatTensor [B]``. Not differentiable.
    """

    differentiable = False

    def __init__(self, lookup: TFBind8ExactLookup | SequenceData):
        super().__init__()
        self.lookup = lookup if isinstance(lookup, TFBind8ExactLookup) else TFBind8ExactLookup(lookup)

    def forward(self, x: Tensor, cond=None) -> Tensor:
        with torch.no_grad():
            return self.lookup(x.detach())


def exact_lookup_reward(dataset) -> ExactLookupReward:
    """``true_reward=tfbind8_exact``: the exact lookup over the task's full table."""
    return ExactLookupReward(dataset.full)


def trained_oracle(dataset, net: nn.Module, *, cache_dir: str | Path, data: SequenceData | None = None,
                   rows: str = "train", normalize_y: bool = False, train_fraction: float = 0.5, epochs: int = 20,
                   batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0) -> OracleReward:
    """Fit ``net`` on ``data`` (default: the task's ``rows``, ``train`` split or ``full`` table) with :class:`OracleRegression`
    (a seeded random ``train_fraction`` of the rows; R² on the rest) and wrap it as the reward.
    ``normalize_y`` fits min-max-normalised labels (over the task's whole table), so an oracle
    with an output sigmoid (ELEGANT Table 5) is bounded like TFBind8's normalised E-score.

    Trained once per (data, network, settings): weights and R² go to the cache entry
    ``<cache_dir>/oracle/<key>/`` (:func:`diffusion_rl.cache.cached`) and later runs load them.
    ``oracle.json`` there records the held-out R² and, when the task has more rows than its
    training split, the R² on all rows (how far the oracle is trusted off the training
    distribution).
    """
    if rows not in ("train", "full"):
        raise ValueError(f"reward.rows must be 'train' or 'full' (got {rows!r})")
    if data is None:
        data = dataset.train if rows == "train" else dataset.full
    lo, hi = (float(dataset.full.y.min()), float(dataset.full.y.max())) if normalize_y else (0.0, 1.0)

    def target(y: Tensor) -> Tensor:  # min-max over the whole table: every oracle of a task shares one scale
        return (y - lo) / (hi - lo)
    settings = dict(data=data.name, rows=len(data), normalize_y=normalize_y, net=repr(net), train_fraction=train_fraction, epochs=epochs,
                    batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)

    def fit(folder: Path) -> dict:
        module = OracleRegression(net, data.tokens, target(data.y), dataset.vocab_size, train_fraction=train_fraction,
                                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)
        log.info("fitting oracle on %s (%d rows x %.2f, %d epochs)", data.name, len(data), train_fraction, epochs)
        L.Trainer(max_epochs=epochs, logger=L.pytorch.loggers.CSVLogger(folder, name="", version=""),
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  num_sanity_val_steps=0, accelerator="cpu", devices=1,
                  callbacks=[ProgressLines("oracle fitting")]).fit(module)
        r2 = {"heldout_r2": module.heldout_r2(), **settings}
        # how well r_hat ranks what the pretrained model generates (its training split)
        r2["train_split_r2"] = r2_score(module.net, dataset.train.tokens, target(dataset.train.y), dataset.vocab_size)
        return r2

    folder, summary = cached_network("oracle", settings, cache_dir, net, fit, "oracle")
    reward = OracleReward(net, dataset.vocab_size, offset=dataset.state_offset)
    reward.summary = summary
    log.info("oracle %s: %s", folder, {k: v for k, v in reward.summary.items() if k.endswith("r2")})
    return reward


@torch.no_grad()
def r2_score(net: nn.Module, tokens: Tensor, y: Tensor, vocab_size: int, chunk: int = 8192) -> float:
    """R² of ``net`` on ``(tokens, y)``, in chunks, accumulated in float64."""
    device = next(net.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64)
    for start in range(0, len(tokens), chunk):
        pred = net(one_hot(tokens[start:start + chunk].to(device), vocab_size))
        sums += _r2_sums(pred, y[start:start + chunk].to(device)).cpu()
    return float(_r2_from_sums(sums))
