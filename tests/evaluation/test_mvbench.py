from __future__ import annotations

import pytest

from lmm.data.sample import BadRecordError, Media
from lmm.evaluation.tasks import mvbench
from lmm.evaluation.tasks.mvbench import MVBenchAccuracy, check_ans

GOLD = "(A) the man opens the door."


@pytest.mark.parametrize(
    ("output", "correct"),
    [
        ("A) the man opens the door.", True),
        ("A", True),  # "(a" is inside "(a)"
        ("A.", True),
        ("", True),  # "(" is inside "(a)": the official quirk
        ("B) the man closes the door.", False),
        ("The answer is A", False),  # "(the"
        ("a) lower case", True),
        ("A) first line\nB) second line", True),
        ("Ａ", False),
        ("A " * 500, True),
    ],
)
def test_check_ans(output, correct):
    assert check_ans(mvbench.parse(output), GOLD) is correct


def test_mean_over_tasks():
    # action_count: 2 of 2 right (100); object_shuffle: 1 of 4 right (25) -> mean 62.5, micro 50
    metas = [{"answer": GOLD, "task": "action_count"}] * 2 + [
        {"answer": "(B) x", "task": "object_shuffle"}
    ] * 4
    preds = [mvbench.parse(o) for o in ("A", "A) yes", "B", "A", "C", "D")]
    metric = MVBenchAccuracy()
    metric.update(preds, metas)
    out = metric.compute()
    assert float(out["accuracy"]) == pytest.approx(62.5)
    assert float(out["micro"]) == pytest.approx(50.0)


def test_read(write_records):
    recs = [
        {
            "video": "v/1.mp4",
            "question": "What happens?",
            "candidates": ["sit", "stand"],
            "answer": "stand",
        }
    ]
    path = write_records(recs, "action_sequence.json", media=("v/1.mp4",))
    [s] = mvbench.read(path)
    assert s.meta["answer"] == "(B) stand"
    assert s.meta["task"] == "action_sequence"
    assert s.meta["assistant_prefix"] == "Best option:("
    assert s.turns[0].role == "system"
    assert s.turns[1].parts == [
        Media(0),
        "\n",
        "Question: What happens?\nOptions:\n(A) sit\n(B) stand\nOnly give the best option.",
    ]
    recs[0]["answer"] = "jump"
    with pytest.raises(BadRecordError, match="'jump' is not among the candidates"):
        mvbench.read(write_records(recs, "action_sequence.json", media=("v/1.mp4",)))
