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
        (" B", False),  # stripped first (official): "(B", not "( B" whose "(" is in "(a)"
        ("  A", True),
        ("\nA) on the second line", True),  # stripped, so the first line is "A) ..."
        ("A### Human: B", True),  # cut at the "###" stop sign
    ],
)
def test_check_ans(output, correct):
    assert check_ans(mvbench.parse(output), GOLD) is correct


def test_mvbench_breakdown():
    # action_count: 2 of 2 right (100); object_shuffle: 1 of 4 right (25) -> Avg (per sample) 50,
    # mean over tasks 62.5
    metas = [{"answer": GOLD, "task": "action_count"}] * 2 + [
        {"answer": "(B) x", "task": "object_shuffle"}
    ] * 4
    preds = [mvbench.parse(o) for o in ("A", "A) yes", "B", "A", "C", "D")]
    metric = MVBenchAccuracy()
    metric.update(preds, metas)
    out = metric.compute()
    assert float(out["accuracy"]) == pytest.approx(50.0)  # the notebook's `Avg`
    assert float(out["micro"]) == pytest.approx(50.0)
    assert float(out["macro"]) == pytest.approx(62.5)
    assert float(out["action_count"]) == 100.0
    assert float(out["object_shuffle"]) == 25.0


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


def test_read_one_file_with_task_type(write_records):
    recs = [
        {"task_type": "Fine-grained Action", "video": "a.mp4", "question": "q",
         "candidates": ["run", "walk"], "answer": "walk"},
        {"task_type": "action_count", "video": "b.mp4", "question": "q",
         "candidates": ["3", "2", "3"], "answer": "3"},
    ]  # fmt: skip
    path = write_records(recs, "mvbench.json", media=("a.mp4", "b.mp4"))
    a, b = mvbench.read(path)
    assert (a.meta["task"], b.meta["task"]) == ("fine_grained_action", "action_count")
    assert (a.id, b.id) == ("fine_grained_action-0", "action_count-1")
    assert b.meta["answer"] == "(C) 3"  # qa_template keeps the last matching candidate
