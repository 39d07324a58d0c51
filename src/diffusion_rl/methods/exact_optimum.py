"""The exact optimum of KL-regularised fine-tuning, as a run (``method=exact_optimum``).

ELEGANT's Theorem 1 (Uehara et al. 2024): the optimally controlled diffusion generates the
tilted distribution ``p_r(x) ∝ exp(r_hat(x) / alpha) p_data(x)``. On an enumerable space
(TFBind8: all 4^8 8-mers) ``p_r`` is computed exactly (:mod:`..evaluation.exact_optimum`), and
this "method" samples from it: no fine-tuning, an ordinary ``generate()``, so the shared
evaluation scores it like every other run and its ``metrics.json`` sits in a table as a row.

``generate`` returns, per sample, ``kl_exact = log p_r(x) - log p_data(x)``, whose mean is an
unbiased estimate of ``KL(p_r ‖ p_data)`` — at the optimum ELEGANT's path KL (its ``kl_div``)
equals this terminal KL. :meth:`extra_metrics` adds the exact expectations the samples
estimate: ``exact_reward`` = ``E_p_r[r_hat]``, ``exact_reward_true`` = ``E_p_r[r]``,
``exact_kl_div`` = ``KL(p_r ‖ p_data)`` and ``exact_entropy`` = ``H(p_r)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.trajectory import Generation
from ..evaluation.exact_optimum import all_sequences, empirical_log_p_data, tilted_log_distribution
from ..seeding import derive_seed
from .pretrained import Pretrained


@torch.no_grad()
def rewards_on(reward, tokens: Tensor, chunk: int = 8192) -> Tensor:
    """``float64 [M]``: ``reward(tokens)`` chunk by chunk, on the device of the reward's
    parameters (CPU when it has none)."""
    device = torch.device("cpu")
    if isinstance(reward, torch.nn.Module):
        reward.eval()
        tensor = next(iter(reward.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(reward.buffers()), None)
        device = tensor.device if tensor is not None else device
    return torch.cat([reward(tokens[i:i + chunk].to(device)).detach().double().reshape(-1).cpu()
                      for i in range(0, tokens.shape[0], chunk)])


P_DATA = ("train", "full", "pretrained")


class ExactOptimum(Pretrained):
    """Samples of ``p_r ∝ exp(r_hat / kl_weight) p_data`` over every sequence of the task.

    Args:
        kl_weight: ELEGANT's ``alpha`` (``0``: all mass on the best sequences of ``p_data``'s support).
        p_data: what is tilted — ``pretrained``: the decoded law of the pretrained chain,
            estimated from ``pretrained_samples`` of its samples (the like-for-like comparator
            of a fine-tuned model: what its KL is measured against is the pretrained chain,
            not the data); ``train``: the empirical distribution of the training split (what
            the pretrained model is fitted to); ``full``: of the whole table.
        smoothing: pseudo-count per sequence added to ``p_data`` (off-data mass, see
            :func:`empirical_log_p_data`).
        pretrained_samples: draws of the pretrained chain for ``p_data: pretrained``.
    """

    fine_tunes = False
    sample_kinds = ("tokens",)

    def __init__(self, backbone, sampler, reward, *, dataset=None, kl_weight: float, p_data: str = "train",
                 smoothing: float = 1e-3, pretrained_samples: int = 100_000, **kw):
        super().__init__(backbone, sampler, reward, dataset=dataset, **kw)
        if p_data not in P_DATA:
            raise ValueError(f"method.p_data must be one of {'|'.join(P_DATA)} (got {p_data!r})")
        if pretrained_samples < 1:
            raise ValueError(f"method.pretrained_samples must be >= 1 (got {pretrained_samples})")
        if not hasattr(dataset, "train") or not hasattr(dataset, "encode"):
            raise ValueError("method=exact_optimum needs a sequence dataset (an enumerable space of tokens)")
        tokens = all_sequences(dataset.length, dataset.vocab_size)  # ValueError when too many to enumerate
        if p_data == "pretrained":
            rows = self._pretrained_draws(int(pretrained_samples))
        else:
            rows = dataset.train.tokens if p_data == "train" else dataset.full.tokens
        log_p_data = empirical_log_p_data(rows, tokens, smoothing=float(smoothing))
        r_hat = rewards_on(reward, tokens)
        log_p = tilted_log_distribution(log_p_data, r_hat, float(kl_weight))
        p = log_p.exp()
        # log p_r - log p_data, and 0 where p_r is 0 (never sampled; avoids -inf - x = nan)
        log_ratio = torch.where(p > 0, log_p - log_p_data, torch.zeros_like(log_p))
        true = self._true_reward  # the genuine reward, passed by the runner (None where unknown)
        self._exact = {"exact_reward": float(p @ r_hat), "exact_kl_div": float(p @ log_ratio),
                       "exact_entropy": float(-(p * log_p.masked_fill(p == 0, 0.0)).sum())}
        if true is not None:
            self._exact["exact_reward_true"] = float(p @ rewards_on(true, tokens))
        # not persistent: recomputed from the data and r_hat, never read from a checkpoint
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("probs", p, persistent=False)
        self.register_buffer("log_ratio", log_ratio, persistent=False)

    @torch.no_grad()
    def _pretrained_draws(self, n: int, chunk: int = 10_000) -> Tensor:
        """``[n, L]`` decoded samples of the pretrained chain, from a generator of their own."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "pretrained_law"))
        draws = []
        for start in range(0, n, chunk):
            traj = self.sampler.rollout(self.reference, min(chunk, n - start), generator=generator,
                                        event_shape=self.backbone.event_shape)
            draws.append(self.decode(traj.final))
        return torch.cat(draws)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator, cond: Any = None) -> Generation:
        """``n`` i.i.d. draws of ``p_r`` as the task's states ``[n, L, V]``, with ``kl_exact``."""
        idx = torch.multinomial(self.probs.to(generator.device), n, replacement=True, generator=generator)
        idx = idx.to(self.tokens.device)
        return Generation(self.dataset.encode(self.tokens[idx]), {"kl_exact": self.log_ratio[idx]})

    def extra_metrics(self) -> dict[str, float]:
        return dict(self._exact)
