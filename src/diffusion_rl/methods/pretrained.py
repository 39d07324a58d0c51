"""No fine-tuning: evaluates the pretrained model (the "Pretrained model A/B" rows)."""

import inspect

from .base import FineTuneMethod

_BASE_KEYS = set(inspect.signature(FineTuneMethod.__init__).parameters)


class Pretrained(FineTuneMethod):
    fine_tunes = False

    def __init__(self, *args, **kw):
        # an experiment sets keys for the methods it compares (e.g. reward_weight); this row
        # has no use for them, and no budget either
        kw = {k: v for k, v in kw.items() if k in _BASE_KEYS}
        kw["iterations"] = 0
        super().__init__(*args, **kw)

    def update(self):  # pragma: no cover - never called with 0 iterations
        raise RuntimeError("the pretrained model is not fine-tuned")
