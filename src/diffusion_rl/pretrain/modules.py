"""Pretraining objectives as Lightning modules; both produce a backbone every method starts from."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..core.processes import BrownianBridgeProcess, ForwardProcess, _bcast
from ..methods.base import _Iterations
from ..seeding import derive_seed


class _Pretrainer(L.LightningModule):
    def __init__(self, backbone: Backbone, process: ForwardProcess, dataset, *, iterations: int,
                 batch_size: int, lr: float, seed: int = 0, iterations_per_epoch: int = 1000,
                 s_min: float = 1e-3):
        super().__init__()
        if iterations < 0 or batch_size <= 0 or lr <= 0:
            raise ValueError("pretrain.iterations >= 0, pretrain.batch_size > 0 and pretrain.lr > 0 required")
        self.backbone, self.process, self.dataset = backbone, process, dataset
        self.iterations, self.batch_size, self.lr, self.seed = iterations, batch_size, lr, seed
        self.iterations_per_epoch = min(iterations_per_epoch, max(iterations, 1))
        self.s_min = s_min
        self._generator = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    @property
    def epochs(self) -> int:
        return -(-self.iterations // self.iterations_per_epoch)

    def train_dataloader(self):
        # a generator of its own: without one every epoch's iterator draws a seed from the global RNG
        return torch.utils.data.DataLoader(_Iterations(self.iterations_per_epoch), batch_size=None,
                                           generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader")))

    def configure_optimizers(self):
        return torch.optim.Adam(self.backbone.parameters(), lr=self.lr)

    def _draw(self):
        """A data batch and per-sample times ``s ~ U(s_min, T)``."""
        x0 = self.dataset.sample(self.batch_size, self.generator).to(self.device)
        u = torch.rand(self.batch_size, generator=self.generator).to(self.device)
        return x0, self.s_min + u * (self.process.T - self.s_min)

    def training_step(self, batch, batch_idx):
        loss = self.loss()
        self.log("pretrain/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=self.batch_size)
        return loss


class ScoreMatching(_Pretrainer):
    """Denoising score matching (Vincent 2011) with weight ``sigma(s)^2``:
    ``E |sigma(s) s_theta(x_s, s) + eps|^2``, ``x_s = alpha(s) x_0 + sigma(s) eps``, where
    ``s_theta`` is the network output read as a score by the process (for an eps network this
    is the usual ``E |eps_theta - eps|^2``)."""

    def loss(self):
        x0, s = self._draw()
        eps = torch.randn(x0.shape, generator=self.generator).to(x0)
        return denoising_score_matching(self.backbone, self.process, x0, s, eps).mean()


def denoising_score_matching(backbone, process: ForwardProcess, x0: Tensor, s: Tensor, eps: Tensor) -> Tensor:
    """``[B]`` per-row ``|sigma(s) s_theta(x_s, s) + eps|^2`` at ``x_s = alpha(s) x_0 + sigma(s) eps``
    (shared with reward-weighted MLE's offline variant, which weights the rows)."""
    alpha, sigma = process.marginal_coeffs(s.cpu())
    alpha, sigma = _bcast(alpha.to(x0), x0), _bcast(sigma.to(x0), x0)
    x = alpha * x0 + sigma * eps
    score = process.to_score(x, s, backbone(x, s))
    return ((sigma * score + eps) ** 2).flatten(1).sum(-1)


class BridgeMatching(_Pretrainer):
    """Brownian-bridge drift regression (ELEGANT App. D; tutorial §9): ``E |b_theta(x, s) - (x_data - x) / s|^2``
    at bridge points between ``N(0, I)`` and the data; needs :class:`BrownianBridgeProcess`."""

    def __init__(self, backbone, process, dataset, **kw):
        if not isinstance(process, BrownianBridgeProcess):
            raise ValueError("pretrain=bridge_matching needs process=brownian_bridge")
        kw.setdefault("s_min", 1e-2)
        super().__init__(backbone, process, dataset, **kw)

    def loss(self):
        x_data, s = self._draw()
        x_noise = torch.randn(x_data.shape, generator=self.generator).to(x_data)
        x, target = self.process.bridge_sample(x_noise, x_data, s, generator=self.generator)
        return ((self.backbone(x, s) - target) ** 2).flatten(1).sum(-1).mean()
