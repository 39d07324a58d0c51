"""No fine-tuning: evaluates the pretrained model (the "Pretrained model A/B" rows)."""

from .base import FineTuneMethod


class Pretrained(FineTuneMethod):
    def __init__(self, *args, **kw):
        kw["iterations"] = 0  # whatever budget an experiment sets for the other methods
        super().__init__(*args, **kw)

    def update(self):  # pragma: no cover - never called with 0 iterations
        raise RuntimeError("the pretrained model is not fine-tuned")
