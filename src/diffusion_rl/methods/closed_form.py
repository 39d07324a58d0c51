"""The base of the closed-form rows of the exact-answer benches (``gaussian_target.py``,
``mixture_target.py``): a "method" that trains nothing and samples a law known in closed form
— or runs the configured sampler with a policy built from it — through the shared evaluation
like any other row, while :meth:`exact` gives the numbers its samples estimate, written to
``metrics.json`` (``exact_*``) so a table sets every method beside the answer theory assigns it.
"""

from __future__ import annotations

from ..rewards.base import QuadraticTarget
from .pretrained import Pretrained


class ClosedFormTarget(Pretrained):
    sample_kinds = ("vectors",)
    #: the values ``method.target`` may take (each subclass's own)
    targets: tuple[str, ...] = ()

    def __init__(self, *args, target: str, kl_weight: float = 1.0, **kw):
        super().__init__(*args, **kw)
        if target not in self.targets:
            raise ValueError(f"method.target must be one of {'|'.join(self.targets)} (got {target!r})")
        if kl_weight <= 0:
            raise ValueError(f"method.kl_weight must be > 0 (got {kl_weight})")
        self.target, self.kl_weight = target, float(kl_weight)
        #: the policy the configured sampler runs for a chain-valued target (None: sampled directly)
        self.target_policy = None

    def require_quadratic_reward(self, dim: int, option: str) -> None:
        """The closed forms tilt by ``-scale |x - c|^2``: any other reward is a config error."""
        if not isinstance(self.reward, QuadraticTarget) or self.reward.target.numel() != dim:
            raise ValueError(f"{type(self).__name__} needs a {dim}-D quadratic reward (reward={option})")

    def eval_policy(self):
        return self.target_policy

    def exact(self) -> dict[str, float]:
        """The target's exact moments, reward, KL and objective (``exact_*`` metrics)."""
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        return self.exact()
