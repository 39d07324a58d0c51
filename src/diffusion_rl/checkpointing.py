"""``last.ckpt``: written atomically at the end of every epoch, checked before a resume.

A fine-tuning run is a Lightning loop of epochs of ``method.iterations_per_epoch`` iterations;
an epoch is the unit a killed run resumes from exactly (Lightning restarts an interrupted
epoch from its beginning, and our iterations draw from the method's generators, which the
checkpoint carries). So the checkpoint period is ``method.iterations_per_epoch`` (50 by
default), and a run killed at any moment — even while writing — loses at most one epoch:
the file is written beside ``last.ckpt`` and renamed over it, never left half-written.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import lightning as L
import torch

CHECKPOINT_NAME = "last.ckpt"


class EpochCheckpoint(L.Callback):
    """Saves the whole training state (weights, optimisers, loops, the method's generators and
    stage, see ``FineTuneMethod.on_save_checkpoint``) to ``path`` at every epoch end."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        # every rank takes part (a collective under DDP); weights_only=False: the whole state
        # (optimisers, loops, generators), not weights alone — what a resume needs
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, self.path)  # atomic on POSIX: readers see the old file or the new


def check_checkpoint(path: Path) -> None:
    """A ``ValueError`` naming ``path`` and the way out when it cannot be resumed from: empty
    or unreadable (a disk that filled up, a copy cut short). Nothing is moved or deleted — the
    user decides whether the run's folder is worth keeping."""
    how = ("delete it to restart this run from the beginning (its other files stay), "
           "or give another hydra.run.dir")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, so this run cannot resume from it: {how}")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is corrupted ({reason}), so this run cannot resume from it: {how}") from None


def checkpoint_step(path: Path) -> int:
    """The first logger step a run resumed from ``path`` logs: the number of iterations done
    (Lightning's logging step counts training batches; its ``global_step`` counts optimiser
    steps, several per iteration for PPO-style methods)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"])
