"""The closed-form rows of the 2-D mixture bench, as runs (``method=mixture_target``).

Data ``p = sum_i w_i N(mu_i, s_i^2 I)`` (``dataset=gmm2d``) and a quadratic reward
``r(x) = -lam |x - c|^2``: the KL-regularised target ``p_r ∝ exp(r/alpha) p`` is again a mixture,
component ``i`` becoming ``N(m_i', v_i' I)`` with ``1/v_i' = 1/s_i^2 + 2 lam/alpha``,
``m_i' = v_i' (mu_i/s_i^2 + 2 lam c/alpha)`` and weight ``∝ w_i N(c; mu_i, (s_i^2 + alpha/(2 lam)) I)``
(derivation in :class:`~diffusion_rl.data.toy.GaussianMixture2D`). ``target``:

* ``tilted``: exact draws of ``p_r``; the per-sample KL term is ``log p_r/p = r/alpha - log Z``,
  whose mean estimates ``KL(p_r || p)`` (``exact_kl`` is the closed form);
* ``data``: exact draws of ``p``: what the pretrained chain approximates (set the Pretrained row
  beside it for the chain's own discretisation error);
* ``tilted_chain``: the configured sampler run with the exact score of the *noised tilted*
  mixture — the continuous-time KL-optimal control (the h-transform's marginals are the forward
  noising of ``p_r``), discretised like every fine-tuned chain: how far the sampler's
  discretisation alone leaves the best chain from ``p_r``. Its KL is the path KL to the pretrained
  chain, like the fine-tuned rows'.

:meth:`extra_metrics` writes the exact weights, means, reward and KL of the law each row stands
for (``p_r`` for ``tilted`` and ``tilted_chain``), so the table sets each method beside them.
"""

from __future__ import annotations

import torch

from ..backbones.mixture_score import MixtureScore
from ..core.trajectory import Generation
from ..data.toy import GaussianMixture2D
from .closed_form import ClosedFormTarget


class MixtureTarget(ClosedFormTarget):
    targets = ("tilted", "data", "tilted_chain")
    example_overrides = ("dataset=gmm2d",)

    def __init__(self, *args, target: str = "tilted", kl_weight: float = 1.0, **kw):
        super().__init__(*args, target=target, kl_weight=kl_weight, **kw)
        if not isinstance(self.dataset, GaussianMixture2D):
            raise ValueError("method=mixture_target needs dataset=gmm2d (a GaussianMixture2D: its tilt is closed form)")
        self.require_quadratic_reward(self.dataset.dim, "quadratic_2d")
        self._c, self._lam = self.reward.target.double().cpu(), self.reward.scale
        weights, means, stds, self.log_z = self.dataset.tilt_parameters(self._c, self._lam, self.kl_weight)
        self.tilted = GaussianMixture2D(weights, means, stds)
        self.law = self.dataset if target == "data" else self.tilted
        if target == "tilted_chain":
            if not isinstance(self.reference, MixtureScore):
                raise ValueError("method.target=tilted_chain needs backbone=mixture_score (it swaps in the tilted mixture)")
            # the reference's copy with the tilted mixture's parameters: zero residual, exact tilted score
            self.target_policy = self.reference.frozen_reference()
            for name, value in (("weights", weights), ("means", means), ("stds", stds)):
                getattr(self.target_policy, name).copy_(value)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond=None) -> Generation:
        if self.target_policy is not None:  # the discretised optimal chain, path KL measured along it
            return super().generate(n, generator, cond)
        device = generator.device
        law = self.law
        comp = torch.multinomial(law.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn((n, law.dim), generator=generator, device=device, dtype=torch.float64)
        x = law.means.to(device)[comp] + law.stds.to(device)[comp, None] * z
        if self.target == "data":
            kl = torch.zeros(n, device=device)
        else:  # log p_r(x)/p(x) = r(x)/alpha - log Z exactly: its mean estimates KL(p_r || p)
            kl = -self._lam * ((x - self._c.to(device)) ** 2).sum(-1) / self.kl_weight - self.log_z
        dtype = torch.get_default_dtype()
        return Generation(x.to(dtype), {"kl_exact": kl.to(dtype)})

    def exact(self) -> dict[str, float]:
        law = self.law
        reward = law.expected_quadratic_reward(self._c, self._lam)
        # KL(p_r || p) = E_{p_r}[r]/alpha - log Z (0 for the data row)
        kl = 0.0 if law is self.dataset else reward / self.kl_weight - float(self.log_z)
        mean = law.mean()
        out = {f"exact_mode_weight_{i}": float(w) for i, w in enumerate(law.weights)}
        out.update(exact_mean_x=float(mean[0]), exact_mean_y=float(mean[1]), exact_reward=reward, exact_kl=kl,
                   exact_objective=reward - self.kl_weight * kl)
        return out
