"""Sample-based metrics shared by every method, so rows of a table are comparable: the
estimators, and the metric objects conf/eval/ lists."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from scipy.stats import t as student_t
from torch import Tensor

from .diversity import mean_pairwise_levenshtein

if TYPE_CHECKING:
    from .evaluate import EvalConfig


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the Student-t 95% interval over independent batch statistics ``[n]``.

    Student-t, not the normal 1.96: the variance is estimated from the same few batches (with
    4 batches the t quantile is 3.18, so 1.96 would be ~1.6x too narrow)."""
    values = values.double()
    n = values.numel()
    if n < 2:
        return values.mean().item(), float("nan")
    sem = values.std(unbiased=True).item() / math.sqrt(n)
    return values.mean().item(), float(student_t.ppf(0.975, n - 1)) * sem


def knn_kl(x: Tensor, y: Tensor, k: int = 1) -> Tensor:
    """k-NN estimate of KL(P ‖ Q) from ``x ~ P`` and ``y ~ Q`` (Wang, Kulkarni & Verdú 2009).

    ``D = d/n sum_i log(nu_k(i) / rho_k(i)) + log(m / (n - 1))`` with ``rho_k(i)`` the distance
    from ``x_i`` to its k-th nearest neighbour among the other ``x`` and ``nu_k(i)`` to its k-th
    nearest neighbour among ``y``. Batched: ``x [..., n, d]``, ``y [..., m, d]`` → ``[...]``.
    """
    n, d, m = x.shape[-2], x.shape[-1], y.shape[-2]
    if n < k + 1 or m < k:
        raise ValueError("knn_kl needs more than k samples from each distribution")
    x, y = x.double(), y.double()
    dxx = torch.cdist(x, x)
    dxx.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    rho = dxx.kthvalue(k, dim=-1).values
    nu = torch.cdist(x, y).kthvalue(k, dim=-1).values
    tiny = torch.finfo(torch.float64).tiny  # duplicated points would give log 0
    return d * (nu.clamp_min(tiny).log() - rho.clamp_min(tiny).log()).mean(-1) + math.log(m / (n - 1))


def mean_pairwise_distance(x: Tensor) -> Tensor:
    """``[...]`` mean Euclidean distance over distinct pairs of ``x [..., n, d]`` (vector diversity)."""
    n = x.shape[-2]
    return torch.cdist(x, x).sum((-1, -2)) / (n * (n - 1))


# ------------------------------------------------------------------ metric objects (conf/eval/)

#: what a sample is: ``[N, d]`` floats, ``[N, L]`` token ids, ``[N, C, H, W]`` pixels (in the data
#: set's ``pixel_range``, [0, 1] unless it declares another; written files are mapped to [0, 1])
SAMPLE_KINDS = ("vectors", "tokens", "images")


def ci_key(name: str) -> str:
    """The key of a metric's 95% half-width: ``<name>_ci95``, where the two reward metrics keep
    their historical ``_mean`` out of it (``reward_mean`` -> ``reward_ci95``), as the reports read."""
    return f"{name.removesuffix('_mean')}_ci95"


@dataclass
class EvalSamples:
    """What every metric reads: one evaluation's ``num_batches x batch_size`` samples."""

    #: decoded samples ``[N, *E]`` of kind ``kind``, on the method's device
    x: Tensor
    kind: str
    #: nominal reward of each sample ``[N]``
    rewards: Tensor
    #: the generation's per-sample KL terms, ``[N]`` each (``kl_path``, ELEGANT's ``kl_init``)
    kl_terms: dict[str, Tensor]
    cfg: EvalConfig
    #: the genuine reward ``r`` (samples -> ``[N]``), or ``None`` where none is known
    true_reward: Callable[[Tensor], Tensor] | None = None
    #: the data set (its ``sample(n, generator)`` draws reference samples), or ``None``
    data: object | None = None
    #: CPU generator of the data-side draws
    data_generator: torch.Generator | None = None
    #: the final states before decoding ``[N, *E]`` (relaxed one-hot sequences), kept only
    #: when a metric asks for them (``needs_states``), and the nominal reward that reads them
    states: Tensor | None = None
    reward_fn: Callable[[Tensor], Tensor] | None = None

    def batch_means(self, values: Tensor) -> Tensor:
        """``[num_batches]`` means of a per-sample quantity ``[N]`` over each batch."""
        return values.float().reshape(self.cfg.num_batches, self.cfg.batch_size).mean(1)

    def flat_batches(self) -> Tensor:
        """The samples as ``[num_batches, batch_size, prod(E)]`` on the CPU."""
        return self.x.reshape(self.cfg.num_batches, self.cfg.batch_size, -1).cpu()


class Metric:
    """One number of the shared evaluation, listed (``_target_``) under ``eval.compute`` in
    conf/eval/. The evaluation writes ``<name>``, the mean over batches of
    :meth:`batch_values`, and :func:`ci_key` of it, its Student-t 95% half-width.

    ``kinds`` are the sample kinds it can read: the evaluation skips it for the others (and
    rejects it, before any compute, when ``eval.select`` names it for such a run)."""

    kinds: tuple[str, ...] = SAMPLE_KINDS
    #: whether it reads the undecoded final states (the evaluation keeps them only then)
    needs_states: bool = False

    def __init__(self, name: str):
        self.name = name

    def batch_values(self, s: EvalSamples) -> Tensor | None:  # pragma: no cover - interface
        """``[num_batches]``: one statistic per batch, or ``None`` when this run has nothing to
        measure (no genuine reward, no such KL term)."""
        raise NotImplementedError


class Reward(Metric):
    """Mean reward of a batch: the nominal ``r_hat`` or (``genuine``) the genuine ``r``."""

    def __init__(self, name: str, genuine: bool = False):
        super().__init__(name)
        self.genuine = genuine

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        if not self.genuine:
            return s.batch_means(s.rewards)
        return None if s.true_reward is None else s.batch_means(s.true_reward(s.x))


class RewardStd(Metric):
    """Standard deviation of ``r_hat`` over the images of a batch (ELEGANT Table 9's
    "Reward (std)": the spread of the scores, not an uncertainty of their mean)."""

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        return s.rewards.double().reshape(s.cfg.num_batches, s.cfg.batch_size).std(1)


class RelaxedReward(Metric):
    """``r_hat`` of the final *state* of a sequence chain, before decoding: the relaxed
    one-hot point itself (``projection: none``, what reward backpropagation maximises) or its
    softmax over the vocabulary (``softmax``, a point of the simplex). Beside the decoded
    ``reward_mean`` it shows how much of a method's gain lives off the one-hot vertices
    (ELEGANT's "NO KL high in r_hat" is partly this)."""

    kinds = ("tokens",)
    needs_states = True

    def __init__(self, name: str, projection: str = "none"):
        super().__init__(name)
        if projection not in ("none", "softmax"):
            raise ValueError(f"projection must be none or softmax (got {projection!r})")
        self.projection = projection

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        if s.states is None or s.reward_fn is None:
            return None
        x = s.states
        if self.projection == "softmax":
            # in one-hot coordinates (GFP's states are differences from the wild type)
            offset = getattr(s.data, "state_offset", None)
            offset = torch.zeros((), device=x.device) if offset is None else offset.to(x.device)
            x = torch.softmax(x + offset, dim=-1) - offset
        chunk = s.cfg.chunk_size
        values = torch.cat([s.reward_fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
        return s.batch_means(values)


class KLTerm(Metric):
    """Mean of the generation's KL term ``name`` (``kl_path``: KL between the generated and
    the pretrained chain; ``kl_init``: ELEGANT's learned initial distribution, the path KL of
    the chain that generates it), when the method's generation has one."""

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        values = s.kl_terms.get(self.name)
        return None if values is None else s.batch_means(values)


class KLDiv(Metric):
    """The sum of every KL term of the generation: ELEGANT's KL-Div (term (b2) of its eq. 5)."""

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        return kl_div_batches(s)


class KLDivPerDim(Metric):
    """:class:`KLDiv` divided by the dimension of the chain's state (16,384 for SD 1.5's
    4x64x64 latents): the units of ELEGANT's image experiment, whose public code logs the mean
    of the per-step KL over latent dimensions (METHODS_SPEC §3.2)."""

    needs_states = True

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        total = kl_div_batches(s)
        return None if total is None or s.states is None else total / s.states[0].numel()


def kl_div_batches(s: EvalSamples) -> Tensor | None:
    """``[num_batches]`` sums of every KL term's batch means (in float64, so kl_div is exactly
    their sum); ``None`` for a generation without KL terms."""
    if not s.kl_terms:
        return None
    return sum(s.batch_means(values).double() for values in s.kl_terms.values())


class KnnKL(Metric):
    """k-NN KL(generated ‖ data) per batch (:func:`knn_kl`), each batch against
    ``data_batch_size`` fresh data points; needs a data set that can be sampled."""

    kinds = ("vectors",)

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        if not hasattr(s.data, "sample"):
            return None
        ref = torch.stack([s.data.sample(s.cfg.data_batch_size, s.data_generator) for _ in range(s.cfg.num_batches)])
        return knn_kl(s.flat_batches(), ref, s.cfg.knn_k)


class SampleMoment(Metric):
    """Per batch, the mean or the (unbiased) variance of one coordinate of vector samples:
    the closed-form bench compares them with each target's exact moments."""

    kinds = ("vectors",)

    def __init__(self, name: str, moment: str = "mean", coordinate: int = 0):
        super().__init__(name)
        if moment not in ("mean", "var"):
            raise ValueError(f"moment must be mean or var (got {moment!r})")
        self.moment, self.coordinate = moment, int(coordinate)

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        x = s.flat_batches()[..., self.coordinate].double()
        return x.mean(1) if self.moment == "mean" else x.var(1, unbiased=True)


class Diversity(Metric):
    """Mean pairwise Levenshtein distance within a batch (ELEGANT's "Div")."""

    kinds = ("tokens",)

    def batch_values(self, s: EvalSamples) -> Tensor:
        return torch.tensor([mean_pairwise_levenshtein(b, workers=1) for b in s.flat_batches()])


class ModeWeights(Metric):
    """Per batch, the share of the samples that belongs to one component of a Gaussian-mixture
    data set (``dataset=gmm2d``): the mean over the batch of that component's *posterior
    probability* under the data law tilted by ``exp(-reward_scale |x - reward_target|^2 /
    kl_weight)`` (the untilted data law when ``kl_weight`` is null).

    Why the tilted posterior, soft: for samples of the tilted law it is exactly unbiased for the
    tilted weight (``E_p[p(i | x)] = w_i`` for any mixture ``p``), so the closed-form row's
    estimate has no assignment bias; and for well-separated modes every sensible rule (nearest
    mean, data posterior, hard or soft) agrees to the overlap mass (1e-4 on the bench)."""

    kinds = ("vectors",)

    def __init__(self, name: str, component: int = 0, kl_weight: float | None = None, reward_target=None,
                 reward_scale: float = 1.0):
        super().__init__(name)
        if kl_weight is not None and (kl_weight <= 0 or reward_target is None):
            raise ValueError(f"{name}: a tilted assignment needs kl_weight > 0 and a reward_target (got {kl_weight})")
        self.component, self.kl_weight, self.reward_scale = int(component), kl_weight, float(reward_scale)
        self.reward_target = None if reward_target is None else [float(v) for v in reward_target]

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        mixture = s.data
        if not hasattr(mixture, "responsibilities"):
            return None  # not a mixture data set: nothing to assign to
        if self.kl_weight is not None:
            mixture = mixture.tilted(self.reward_target, self.reward_scale, self.kl_weight)
        if not 0 <= self.component < mixture.weights.numel():
            raise ValueError(f"{self.name}: component {self.component} of a {mixture.weights.numel()}-component mixture")
        x = s.flat_batches().double()
        resp = mixture.responsibilities(x.reshape(-1, x.shape[-1]))[:, self.component]
        return resp.reshape(x.shape[0], x.shape[1]).mean(1)


class PairwiseDistance(Metric):
    """Image diversity: the mean Euclidean distance over distinct pairs of a batch, between the
    pixels (``space: pixels``, in the data's pixel range) or between the nominal reward's
    features (``space: features``: a classifier reward's penultimate layer, its
    ``features(x)``; nothing to measure for a reward without one). Pixel distances see a
    shifted stroke as far; feature distances see two drawings of one digit as close."""

    kinds = ("images",)

    def __init__(self, name: str, space: str = "pixels"):
        super().__init__(name)
        if space not in ("pixels", "features"):
            raise ValueError(f"space must be pixels or features (got {space!r})")
        self.space = space

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        if self.space == "pixels":
            return mean_pairwise_distance(s.flat_batches().double())
        features = getattr(s.reward_fn, "features", None)
        if features is None:
            return None
        chunk = s.cfg.chunk_size
        values = torch.cat([features(s.x[i:i + chunk]) for i in range(0, s.x.shape[0], chunk)])
        return mean_pairwise_distance(values.reshape(s.cfg.num_batches, s.cfg.batch_size, -1).cpu().double())


class Objective(Metric):
    """Per batch, the KL-regularised objective ``mean r_hat - kl_weight * KL-Div`` (every KL
    term of the generation, as :class:`KLDiv`): the number every KL-regularised method maximises,
    which the exact-answer benches set beside the target's exact value (the objective gap). A
    generation without a KL term has nothing to measure."""

    def __init__(self, name: str, kl_weight: float):
        super().__init__(name)
        if kl_weight < 0:
            raise ValueError(f"{name}: kl_weight must be >= 0 (got {kl_weight})")
        self.kl_weight = float(kl_weight)

    def batch_values(self, s: EvalSamples) -> Tensor | None:
        kl = kl_div_batches(s)
        return None if kl is None else s.batch_means(s.rewards).double() - self.kl_weight * kl
