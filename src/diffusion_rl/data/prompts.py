"""Text prompts as a data set: what a text-to-image fine-tuning run trains and evaluates on.

There are no data rows: Stable Diffusion is fine-tuned from its own samples. The "data set" is
the two prompt lists of ELEGANT §8.3 (METHODS_SPEC §3.1) — the 45 simple animals a training
batch draws from, and the 8 evaluation prompts every evaluation cycles through in order (the
evaluation's chain noise is fixed by its seed, so an evaluation is a fixed set of images) —
and the kind of sample a run produces (images in [-1, 1], what the VAE decodes to).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["PromptSet"]


class PromptSet:
    """Args:
        train_prompts: the prompts a training batch draws from, uniformly with replacement.
        eval_prompts: the prompts the evaluation cycles through (image ``i`` gets prompt
            ``i mod len(eval_prompts)``).
    """

    sample_kind = "images"
    #: the VAE's pixel range (written images are mapped from it to [0, 1])
    pixel_range = (-1.0, 1.0)

    def __init__(self, train_prompts: Sequence[str], eval_prompts: Sequence[str]):
        self.train_prompts = [str(p) for p in train_prompts]
        self.eval_prompts = [str(p) for p in eval_prompts]
        for name, prompts in (("train_prompts", self.train_prompts), ("eval_prompts", self.eval_prompts)):
            if not prompts:
                raise ValueError(f"dataset.{name} must list at least one prompt")

