"""The closed-form test bed (METHODS_SPEC §0.3): N(0, 1) data under the OU process, whose
exact score is ``-x`` at every time, an Euler–Maruyama chain, a quadratic reward, and a
policy class that contains both the pretrained model and every method's optimum: one
affine score ``a_k x + b_k`` per step. The chain's closed forms live in
:mod:`diffusion_rl.evaluation.linear_gaussian`; here are the pieces a test builds a method from."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion_rl.backbones.affine import AffineStepScore  # noqa: F401 (the bed's policy class)
from diffusion_rl.core.processes import OUProcess
from diffusion_rl.core.samplers import EulerMaruyama
from diffusion_rl.evaluation.linear_gaussian import LinearGaussianChain, affine_means, chain_of
from diffusion_rl.rewards.base import QuadraticTarget

LAM, TARGET = 1.0, 2.0  # r(x) = -LAM (x - TARGET)^2


def sampler(K: int, T: float) -> EulerMaruyama:
    return EulerMaruyama(OUProcess(T=T), K)


def pretrained_chain(sam: EulerMaruyama) -> LinearGaussianChain:
    _, prior_std = sam.process.marginal_coeffs(torch.tensor(sam.process.T))
    return chain_of(sam, lambda x, s, c: -x, prior_var=float(prior_std) ** 2)


def reward() -> QuadraticTarget:
    return QuadraticTarget([TARGET], scale=LAM)


def perturbed_backbone(sam: EulerMaruyama, seed: int = 0, size: float = 0.3) -> AffineStepScore:
    """A policy away from the pretrained one, so every gradient term is non-zero."""
    g = torch.Generator().manual_seed(seed)
    K = sam.num_steps
    return AffineStepScore(sam.times, -1.0 + size * torch.randn(K, generator=g), size * torch.randn(K, generator=g))


def policy_means(sam: EulerMaruyama, backbone: nn.Module) -> tuple[Tensor, Tensor]:
    """The transition means' ``(slopes, intercepts)`` under ``backbone``, differentiable in its
    parameters (the exact gradient of any closed-form functional is one backward away)."""
    return affine_means(sam, backbone)


def sgd_update(method, lr: float = 1.0) -> Tensor:
    """Run ``method.update()`` once with plain SGD outside Lightning and return
    ``-(change of the trainable parameters) / lr``: the gradient the update used."""
    params = list(method.backbone.trainable_parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=lr)
    method.optimizers = lambda: opt
    method.manual_backward = lambda loss: loss.backward()
    method.update()
    grad = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)]) / lr
    with torch.no_grad():  # back to where it was: repeated calls sample the same gradient
        for p, b in zip(params, before):
            p.copy_(b)
    return grad


def train(method, iterations: int) -> None:
    """``method.update()`` with the method's own optimisers, outside Lightning (the 1-D bed
    needs thousands of cheap steps; Lightning's per-step overhead would dominate)."""
    opts = method.configure_optimizers()
    method.optimizers = lambda: opts
    method.manual_backward = lambda loss: loss.backward()
    for i in range(iterations):
        if i == (2 * iterations) // 3:  # the last third at a tenth of the rate: less stationary SGD noise
            for opt in (opts if isinstance(opts, (list, tuple)) else [opts]):
                for group in opt.param_groups:
                    group["lr"] /= 10
        method.update()


def prior_var(T: float) -> float:
    return 1 - math.exp(-2 * T)


class DetachedReference(nn.Module):
    """Negative control: the exact pretrained score evaluated under ``no_grad`` (the audit's
    bug: the reference's dependence on the visited state is lost)."""

    def __init__(self, times: Tensor):
        super().__init__()
        self.score = AffineStepScore(times).requires_grad_(False)

    def forward(self, x: Tensor, s: Tensor, cond=None) -> Tensor:
        with torch.no_grad():
            return self.score(x, s, cond)
