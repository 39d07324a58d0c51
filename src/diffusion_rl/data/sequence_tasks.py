"""Biological sequence datasets as the runner sees them (ELEGANT §8.1, App. F.1).

A *task* bundles what every stage needs from one sequence dataset:

* ``sample(n, generator)``: training rows as relaxed one-hot states ``[n, L, V]`` (what
  score-matching pretraining and the guidance classifier draw);
* ``train``: the labelled training rows (``SequenceData``) the diffusion model and the
  nominal oracle ``r_hat`` are fitted to;
* ``encode`` / ``decode``: tokens ↔ diffusion states (argmax decoding).

The genuine reward ``r`` is not part of a task: it is its own config entry
(``conf/true_reward/``), built by the runner like the nominal reward, so ``data/`` imports
nothing from ``rewards/``.

``length`` and ``vocab_size`` are checked against the data, so configs can interpolate them
(``backbone.length: ${dataset.length}``) without loading anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .gfp import GFP_NAME, gfp_elegant_train_split, load_gfp, load_gfp_reference
from .sequences import SequenceData, one_hot
from .tfbind8 import load_tfbind8, tfbind8_train_split

__all__ = ["SequenceTask", "TFBind8Task", "GFPTask"]


class SequenceTask:
    """Base: a training split, its one-hot states, and argmax decoding."""

    full: SequenceData
    train: SequenceData
    #: what a sample is (validation matches it against a method's ``sample_kinds``)
    sample_kind = "tokens"

    def __init__(self, full: SequenceData, train: SequenceData, length: int, vocab_size: int):
        if (train.length, train.vocab_size) != (length, vocab_size):
            raise ValueError(f"dataset.length={length} / vocab_size={vocab_size} do not match the data "
                             f"({train.length} / {train.vocab_size})")
        self.full, self.train = full, train
        self.length, self.vocab_size = int(length), int(vocab_size)
        self.event_shape = (self.length, self.vocab_size)

    @property
    def name(self) -> str:
        return self.train.name

    # --- representation ---------------------------------------------------------------
    @property
    def state_offset(self) -> Tensor | None:
        """What the diffusion state is measured from (``None``: plain one-hot)."""
        return None

    def encode(self, tokens: Tensor) -> Tensor:
        x = one_hot(tokens, self.vocab_size)
        return x if self.state_offset is None else x - self.state_offset.to(x.device)

    def decode(self, x: Tensor) -> Tensor:
        """Relaxed state ``[B, L, V]`` -> tokens ``LongTensor [B, L]`` (argmax)."""
        if not x.is_floating_point():
            return x
        if self.state_offset is not None:
            x = x + self.state_offset.to(x.device)
        return x.argmax(dim=-1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training rows drawn uniformly with replacement, as states ``[n, L, V]``."""
        idx = torch.randint(0, len(self.train), (n,), generator=generator)
        return self.encode(self.train.tokens[idx])


class TFBind8Task(SequenceTask):
    """TFBind8: ``full`` holds all 4^8 8-mers (the exact lookup's table); ``train``, what the
    diffusion model is fitted to, is ``rows``: ``median_split`` — design-bench's training
    split (y <= median, 32,898 rows) — or ``full``, every 8-mer (ELEGANT App. F.1.1: "to
    construct diffusion models, we use all datasets")."""

    def __init__(self, data_dir: str | Path, length: int = 8, vocab_size: int = 4, rows: str = "median_split"):
        if rows not in ("median_split", "full"):
            raise ValueError(f"dataset.rows must be median_split or full (got {rows!r})")
        full = load_tfbind8(data_dir)
        super().__init__(full, tfbind8_train_split(full) if rows == "median_split" else full, length, vocab_size)


class GFPTask(SequenceTask):
    """GFP (Sarkisyan 2016 protein-level table; a *proxy* for design-bench GFP).

    ELEGANT App. F.1.1: the top samples form the training set, and the model works on "the
    difference between the original sequence and the baseline sequence": states are
    ``one_hot(x) - one_hot(wild type)``, so the wild type sits at the origin and a mutation
    is a +1/-1 pair. The genuine reward is unknown (``true_reward=gfp_proxy_oracle`` fits a
    proxy on *all* 51,715 rows, which the reports label as a proxy).
    """

    def __init__(self, data_dir: str | Path, top_fraction: float, length: int = 237, vocab_size: int = 20,
                 max_samples: int | None = None):
        full = load_gfp(data_dir)
        super().__init__(full, gfp_elegant_train_split(full, top_fraction, max_samples), length, vocab_size)
        self._offset = one_hot(load_gfp_reference(data_dir), vocab_size)

    @property
    def name(self) -> str:
        return f"{GFP_NAME}:{self.train.name}"

    @property
    def state_offset(self) -> Tensor:
        return self._offset
