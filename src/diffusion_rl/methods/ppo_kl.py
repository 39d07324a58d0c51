"""PPO + KL (ELEGANT App. E.3, eqs. 22–23): DDPO's clipped ratio with a KL penalty in the reward.

ELEGANT builds this baseline by "modifying the DDPO codebase to include the added KL penalty
term" and contrasts it with DPOK, where "the KL term is directly differentiated". Eqs. 22–23
are lost in our copy; we read them as the RLHF-style shaped return: step ``k`` of a chain
earns ``-kl_weight KL_k`` (the Gaussian KL of that transition to the pretrained one, at the
visited state) and the last step also earns ``r(x_K)``, so the advantage of step ``k`` is the
return-to-go

    A_k = r(x_K) - kl_weight * sum_{j >= k} KL_j     (minus its batch mean at step k),

normalised by its standard deviation as in DDPO. The policy update is the family's clipped
surrogate on those per-step advantages; no gradient flows through the KL itself. The
objective's optimum is the same entropy-regularised one as ELEGANT's drift control with
``alpha = kl_weight`` (its initial distribution stays the pretrained prior).
"""

from __future__ import annotations

from torch import Tensor

from ..core.trajectory import Trajectory
from .policy_gradient import PolicyGradientMethod


class PPOKL(PolicyGradientMethod):
    def __init__(self, *args, kl_weight: float = 0.1, **kw):
        super().__init__(*args, **kw)
        if kl_weight < 0:
            raise ValueError(f"method.kl_weight must be >= 0 (got {kl_weight})")
        self.kl_weight = kl_weight

    def advantages(self, rewards: Tensor, traj: Trajectory) -> Tensor:
        kl = traj.kl.detach()  # [K, B], at the rollout's (old) parameters
        kl_to_go = kl.flip(0).cumsum(0).flip(0)
        returns = self.reward_weight * rewards.unsqueeze(0) - self.kl_weight * kl_to_go  # [K, B]
        adv = returns - returns.mean(1, keepdim=True)
        if self.normalize_advantages:
            adv = adv / (adv.std() + 1e-8)
        return adv
