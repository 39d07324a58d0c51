"""The exact target of entropy-regularised fine-tuning on an enumerable sequence space.

ELEGANT (Uehara et al. 2024, eq. 5 and Theorem 1) fine-tunes a pretrained diffusion model by

    max_u  E[r_hat(x_T)] - alpha KL(P^u || P^data)          (path measures)

and shows that the optimally controlled SDE (with its learned initial distribution, §6)
generates at ``t = T`` the exponentially tilted distribution

    p_r(x) = exp(r_hat(x) / alpha) p_data(x) / Z,     Z = sum_x exp(r_hat(x) / alpha) p_data(x),

where ``p_data`` is the distribution the pretrained model generates. On TFBind8 the whole space
(all 4^8 = 65,536 8-mers) can be enumerated, so ``p_r`` and the three numbers ELEGANT reports
(reward, KL-Div, Div; §8 "Evaluation") can be computed *exactly* for a given ``p_data`` and
``r_hat`` (``method=exact_optimum`` samples it, :mod:`..methods.exact_optimum`): this is the ceiling a perfect solver of the control problem would reach, against
which sampled fine-tuning runs can be compared. At the optimum
``KL(p_r || p_data) = E_{p_r}[r_hat] / alpha - log Z``.

``p_data`` over the enumerable space: :func:`empirical_log_p_data` (the training split's
empirical distribution, Laplace-smoothed), because ELEGANT's pretrained model is fitted to
(and approximates) that data set.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["all_sequences", "empirical_log_p_data", "tilted_log_distribution", "tilted_distribution"]


def all_sequences(length: int, vocab_size: int) -> Tensor:
    """Every sequence of ``length`` tokens over ``vocab_size`` letters, ``LongTensor [V^L, L]``,
    in base-``V`` order with the first token most significant (for TFBind8 row ``i`` has
    ``tokens_to_index == i``)."""
    if length <= 0 or vocab_size <= 0 or vocab_size**length > 2**26:
        raise ValueError(f"refusing to enumerate {vocab_size}^{length} sequences")
    index = torch.arange(vocab_size**length)
    powers = vocab_size ** torch.arange(length - 1, -1, -1)
    return (index[:, None] // powers) % vocab_size


def _codes(tokens: Tensor, base: int) -> Tensor:
    """Base-``base`` integer code of each row of ``tokens [N, L]`` (first token most significant)."""
    length = tokens.shape[1]
    if base**length >= 2**63:
        raise ValueError(f"{base}^{length} sequences are too many to index (not an enumerable space)")
    powers = base ** torch.arange(length - 1, -1, -1, device=tokens.device)
    return (tokens.long() * powers).sum(-1)


def empirical_log_p_data(tokens_train: Tensor, all_tokens: Tensor, smoothing: float) -> Tensor:
    """Log of the Laplace-smoothed empirical distribution of ``tokens_train`` over ``all_tokens``.

    ``p_data(x) = (count_train(x) + smoothing) / (N + smoothing * M)``: every training row counts
    once (a sequence occurring twice, e.g. TFBind8's palindromes, gets count 2) and each of the
    ``M`` enumerated sequences receives ``smoothing`` pseudo-counts, so sequences outside the
    training set keep a small non-zero mass (``smoothing = 0``: they get ``-inf``).

    Choice: ELEGANT's pretrained diffusion model is fitted to the training data and approximates
    its empirical distribution; a diffusion model with finite capacity also puts some mass off
    the data, which the smoothing stands in for. Pick ``smoothing`` so the off-data mass
    ``(M - N_distinct) * smoothing / (N + smoothing * M)`` is small (TFBind8 training split,
    N = 32,898, M = 65,536: ``smoothing = 1e-3`` leaves ~0.1 % off the data; ``smoothing = 1``
    would put ~half the mass there). Measuring the pretrained model's own off-data mass
    (e.g. the share of its samples outside the training set) is the principled way to set it.

    Args:
        tokens_train: ``LongTensor [N, L]``, each row must occur in ``all_tokens``.
        all_tokens: ``LongTensor [M, L]``, the enumerable space (distinct rows).
        smoothing: additive pseudo-count per sequence, ``>= 0``.

    Returns:
        ``float64 [M]``, aligned with the rows of ``all_tokens``; ``logsumexp == 0``.
    """
    if smoothing < 0 or not math.isfinite(smoothing):
        raise ValueError(f"smoothing must be a finite number >= 0 (got {smoothing})")
    if tokens_train.ndim != 2 or all_tokens.ndim != 2 or tokens_train.shape[1] != all_tokens.shape[1]:
        raise ValueError(f"need tokens_train [N, L] and all_tokens [M, L] (got {tuple(tokens_train.shape)}, "
                         f"{tuple(all_tokens.shape)})")
    n, m = tokens_train.shape[0], all_tokens.shape[0]
    if n == 0 and smoothing == 0:
        raise ValueError("empty training set with smoothing=0 defines no distribution")
    base = int(max(all_tokens.max(), tokens_train.max() if n else 0)) + 1
    all_codes, train_codes = _codes(all_tokens.cpu(), base), _codes(tokens_train.cpu(), base)
    sorted_codes, order = torch.sort(all_codes)
    if (sorted_codes[1:] == sorted_codes[:-1]).any():
        raise ValueError("all_tokens must list each sequence once")
    pos = torch.searchsorted(sorted_codes, train_codes).clamp_max(m - 1)
    if not torch.equal(sorted_codes[pos], train_codes):
        missing = int((sorted_codes[pos] != train_codes).sum())
        raise ValueError(f"{missing} training sequences are not in all_tokens")
    counts = torch.empty(m, dtype=torch.float64)
    counts[order] = torch.bincount(pos, minlength=m).double()
    return torch.log(counts + smoothing) - math.log(n + smoothing * m)


def tilted_log_distribution(log_p_data: Tensor, r_hat: Tensor, alpha: float) -> Tensor:
    """``log p_r`` in float64; see :func:`tilted_distribution`."""
    if log_p_data.shape != r_hat.shape or log_p_data.ndim != 1:
        raise ValueError(f"log_p_data and r_hat must both be [M] (got {tuple(log_p_data.shape)}, {tuple(r_hat.shape)})")
    log_p_data, r_hat = log_p_data.double(), r_hat.double()
    if torch.isnan(log_p_data).any() or torch.isnan(r_hat).any() or torch.isinf(r_hat).any():
        raise ValueError("log_p_data and r_hat must not contain NaN (and r_hat must be finite)")
    alpha = float(alpha)
    if math.isnan(alpha) or alpha < 0:
        raise ValueError(f"alpha must be >= 0 (got {alpha})")
    support = log_p_data > -math.inf
    if not support.any():
        raise ValueError("p_data has no support")
    if alpha == 0.0:
        # alpha -> 0+ limit: all mass on the maximisers of r_hat within supp(p_data), shared in
        # proportion to p_data (exactly what exp(r/alpha) p_data / Z tends to).
        best = r_hat.masked_fill(~support, -math.inf).max()
        logits = log_p_data.masked_fill(r_hat != best, -math.inf)
    else:
        logits = r_hat / alpha + log_p_data  # alpha = inf gives p_data
    return logits - torch.logsumexp(logits, dim=0)


def tilted_distribution(log_p_data: Tensor, r_hat: Tensor, alpha: float) -> Tensor:
    """``p_r(x) ∝ exp(r_hat(x) / alpha) p_data(x)`` over an enumerated space, in float64.

    Computed in log space (``softmax(r_hat / alpha + log p_data)``), so very small ``alpha`` or
    very small ``p_data`` do not overflow. ``alpha = 0`` is handled as the limit ``alpha -> 0+``:
    the uniform-in-``p_data`` distribution over the argmax set of ``r_hat`` restricted to the
    support of ``p_data`` (a point mass when the maximiser is unique); ``alpha = inf`` returns
    ``p_data``; ``alpha < 0`` raises.

    Args:
        log_p_data: ``[M]`` log-probabilities of the reference (``-inf`` allowed off-support).
        r_hat: ``[M]`` finite rewards.
        alpha: KL weight (ELEGANT's ``alpha``).

    Returns:
        ``float64 [M]`` probabilities summing to 1.
    """
    return tilted_log_distribution(log_p_data, r_hat, alpha).exp()
