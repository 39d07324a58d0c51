"""Image grids in TensorBoard and W&B during fine-tuning (image data sets only).

At the end of every epoch :class:`TrainingImageGrids` samples ``num_images`` images of the
current model from a *fixed* noise (a generator seeded from the run's seed and the role
``image_grid``, fresh each epoch: the same draws every epoch, so the grids show the model
changing, not the noise) and hands one grid to each dashboard logger: TensorBoard's
``add_image`` and W&B's ``log_image``, at the step of the epoch's last iteration (the
curves' step axis). The CSV logger gets nothing.

The grids must not change what the run computes: the method's two generators, the global
generator and the counters the run reports (reward queries and gradients, saved-for-backward
peak) are restored after the sampling, so ``metrics.json`` is byte-identical with grids on or
off (``tests/test_image_grids.py``). ``dashboard.image_grid.num_images: 0`` turns them off.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from .evaluation.samples import image_grid
from .seeding import derive_seed

__all__ = ["TrainingImageGrids", "training_image_grids"]

#: the tag of the grids in TensorBoard and the key in W&B
GRID_KEY = "train/samples"
#: what a method's grid sampling may change and is put back afterwards
_COUNTERS = ("reward_queries", "reward_gradient_rows", "saved_for_backward_peak", "_saved_bytes", "_last_final")


class TrainingImageGrids(L.Callback):
    """One grid of ``num_images`` fixed-noise samples per epoch to TensorBoard and W&B."""

    def __init__(self, num_images: int, seed: int, pixel_range: tuple[float, float] = (0.0, 1.0), upscale: int = 1):
        if num_images < 1 or upscale < 1:
            raise ValueError(f"dashboard.image_grid: num_images and upscale must be >= 1 (got {num_images}, {upscale})")
        self.num_images, self.seed, self.upscale = int(num_images), int(seed), int(upscale)
        self.pixel_range = tuple(float(v) for v in pixel_range)

    @staticmethod
    def _dashboards(trainer) -> list:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, (TensorBoardLogger, WandbLogger))]

    def grid(self, method) -> np.ndarray:
        """``[H, W, 3]`` in [0, 1]: the current model's samples from the fixed noise."""
        generator = torch.Generator(device=method.device).manual_seed(derive_seed(self.seed, "image_grid"))
        streams = [g for g in (method._generator, method._data_generator) if g is not None]
        states = [g.get_state() for g in streams]
        counters = {k: getattr(method, k) for k in _COUNTERS}
        # each module's own mode: method.train() would also switch the frozen reward / reference
        # (kept in eval mode) into training mode
        modes = {m: m.training for m in method.modules()}
        devices = [method.device] if method.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # whatever a method draws from the global stream
                method.eval()
                # decoded: pixels for a latent model (the VAE), clamped pixels for the digits
                x = method.decode(method.generate(self.num_images, generator).states).detach().float().cpu()
        finally:
            for m, mode in modes.items():
                m.training = mode
            for g, state in zip(streams, states):
                g.set_state(state)
            for k, v in counters.items():
                setattr(method, k, v)
        lo, hi = self.pixel_range
        images = ((x - lo) / (hi - lo)).clamp(0, 1).numpy()
        grid = image_grid(images)
        return np.kron(grid, np.ones((self.upscale, self.upscale, 1), dtype=grid.dtype))  # nearest-neighbour

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        dashboards = self._dashboards(trainer)
        if not dashboards or not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        grid = self.grid(pl_module)
        step = min((trainer.current_epoch + 1) * pl_module.iterations_per_epoch, pl_module.iterations)
        for logger in dashboards:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(GRID_KEY, grid, global_step=step, dataformats="HWC")
            else:
                logger.log_image(key=GRID_KEY, images=[grid], step=step)


def training_image_grids(cfg, kind: str, dataset) -> list[L.Callback]:
    """The callback for ``cfg.dashboard.image_grid`` where it applies (image runs, > 0 images)."""
    spec = (cfg.get("dashboard") or {}).get("image_grid") or {}
    n = int(spec.get("num_images", 0) or 0)
    if kind != "images" or n <= 0:
        return []
    return [TrainingImageGrids(n, cfg.seed, getattr(dataset, "pixel_range", (0.0, 1.0)), int(spec.get("upscale", 1)))]
