from __future__ import annotations

import pytest

from lmm.evaluation.tasks import nlvr2


def test_nlvr2_breakdown():
    # Mantis prints multi-choice and overall accuracy; NLVR2 is all multi-choice, so they agree.
    meta = {"question_type": "multi-choice", "answer": "A", "options": ["True", "False"]}
    outputs = ["A", "True", "untrue", "It is not false, it's true", "B", ""]
    metric = nlvr2.NLVR2Accuracy()
    metric.update([nlvr2.parse(o, meta) for o in outputs], [meta] * len(outputs))
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"accuracy": 50.0, "multi-choice": 50.0})
