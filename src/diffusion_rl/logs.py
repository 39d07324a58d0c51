"""What a run prints: each line once, no advertisements, no warnings that are false here, and
progress that suits where it goes (a bar on a terminal, a few lines in a redirected log).

Hydra configures the root logger (console + ``<run_dir>/cli.log``); Lightning, imported later,
adds its own console handler to ``lightning.pytorch`` — every Lightning line then appears
twice. :func:`quiet_libraries` removes that handler (the lines reach Hydra's through
propagation) and filters what does not help a reader of the log.
"""

from __future__ import annotations

import logging
import sys
import warnings

import lightning as L

#: Lightning info lines that are advertisements or about hardware this project never uses
DROPPED_LINES = ("litlogger", "TPU available", "HPU available", "💡 Tip")
#: warnings that are false for this project (message regexes), each with the reason
IGNORED_WARNINGS = (
    # the runner moves an earlier metrics.csv aside before a resume; nothing is deleted
    r"Experiment logs directory .* exists and is not empty",
    # the frozen pretrained reference (and the guidance classifier) are in eval mode by design
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # inside Lightning, about torch's pytree API; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the iterations "dataset" (methods/base.py) is iterable on purpose and has no workers
    r"Your `IterableDataset` has `__len__` defined",
    # Lightning's own all_gather (per-rank generator states in a DDP checkpoint)
    r"torch.distributed.nn.functional.all_gather is deprecated",
)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in DROPPED_LINES)


def quiet_libraries() -> None:
    """Idempotent; called by the runner before it builds a trainer."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())
    # filters on a logger do not see records of its children: add to the emitting ones too
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def interactive() -> bool:
    """Whether progress bars can redraw in place (a terminal, not a file or a pipe)."""
    return sys.stderr.isatty()


class ProgressLines(L.Callback):
    """Progress for a log file (or a table's jobs, which show no bars): one line at each
    quarter of the epochs — a bar's carriage returns would write megabytes into a log."""

    def __init__(self, stage: str, every_fraction: float = 0.25):
        self.stage, self.every_fraction = stage, every_fraction

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done, total = trainer.current_epoch + 1, trainer.max_epochs or 1
        step = max(1, round(total * self.every_fraction))
        if trainer.is_global_zero and (done % step == 0 or done == total):
            logging.getLogger("diffusion_rl.progress").info("%s: epoch %d/%d (%d%%)", self.stage, done, total,
                                                            100 * done // total)


class Progress:
    """Progress of a loop outside Lightning (the evaluation): a tqdm bar on a terminal — the
    library of Lightning's own bars — and otherwise one line at each quarter of the steps."""

    def __init__(self, stage: str, total: int, every_fraction: float = 0.25):
        from tqdm.auto import tqdm

        self.stage, self.total, self.done = stage, max(1, total), 0
        self.every = max(1, round(self.total * every_fraction))
        self.bar = tqdm(total=self.total, desc=stage, leave=False, disable=not interactive())

    def step(self, what: str) -> None:
        """One step done; ``what`` names it (shown on the bar and in the log line)."""
        self.done += 1
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update()
        if self.bar.disable and (self.done % self.every == 0 or self.done == self.total):
            logging.getLogger("diffusion_rl.progress").info("%s: %d/%d (%s)", self.stage, self.done, self.total, what)

    def close(self) -> None:
        self.bar.close()
