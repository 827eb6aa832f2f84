"""Metrics as torchmetrics (they sync across ranks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def normalize_answer(text: str) -> str:
    """Lower-case, strip whitespace and trailing punctuation ('Red.' == 'red')."""
    return text.strip().lower().rstrip(".!?").strip()


class ExactMatch(Metric):
    """Share of predictions equal to the reference after `normalize_answer`."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        for pred, ref in zip(predictions, references, strict=True):
            self.correct += int(normalize_answer(pred) == normalize_answer(ref))
            self.total += 1

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
