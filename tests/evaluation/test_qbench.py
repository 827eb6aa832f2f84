from __future__ import annotations

import random

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.tasks import qbench
from lmm.evaluation.tasks.qbench import QBenchAccuracy


def _meta():
    return {
        "answer": "B",
        "all_choices": ["A", "B", "C"],
        "index2ans": {"A": "Yes", "B": "No", "C": "Not sure"},
    }


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("A B", "B"),  # ambiguous: the last one wins (lmms-eval crashes here)
        ("I would say the answer here is No", "B"),  # > 5 words: option text "no"
        # "no" (inside "not") and "not sure" both start at 6: np.argmax keeps the first -> B
        ("I am not sure about it at all", "B"),
    ],
)
def test_parse(output, expected):
    assert qbench.parse(output, _meta(), random.Random(0)) == expected


def test_unparsed_uses_seeded_fallback():
    assert qbench.parse("", _meta(), random.Random(42)) == random.Random(42).choice(["A", "B", "C"])


def test_read_and_score(write_records):
    recs = [
        {
            "id": 0,
            "img_path": "q.jpg",
            "question": "Is it blurry?",
            "option0": "Yes",
            "option1": "No",
            "option2": "N/A",
            "option3": "N/A",
            "correct_choice": "B",
            "question_type": 0,
            "question_concern": 1,
        }
    ]
    [s] = qbench.read(write_records(recs, media=("q.jpg",)))
    assert s.meta["all_choices"] == ["A", "B"]
    assert s.turns[0].parts[-1] == (
        "Is it blurry?\nA. Yes\nB. No\n\nAnswer with the option's letter from the given choices directly."
    )
    metric = QBenchAccuracy()
    metric.update(["B", "A"], [s.meta, s.meta])
    assert float(metric.compute()["accuracy"]) == pytest.approx(50.0)
    recs[0]["correct_choice"] = 3  # index beyond the 2 real options
    with pytest.raises(BadRecordError, match="correct_choice 3"):
        qbench.read(write_records(recs, media=("q.jpg",)))
