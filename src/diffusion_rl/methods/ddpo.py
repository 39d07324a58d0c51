"""DDPO (Black et al. 2024): clipped policy gradient on the denoising chain, no KL.

The plain member of the policy-gradient family (:mod:`.policy_gradient`): one advantage per
chain from the terminal reward, normalised by the batch reward std, and no regulariser.
"""

from __future__ import annotations

from .policy_gradient import PolicyGradientMethod


class DDPO(PolicyGradientMethod):
    pass
