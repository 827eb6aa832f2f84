from __future__ import annotations

import random

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.tasks import qbench
from lmm.evaluation.tasks.qbench import QBenchAccuracy


def _meta():
    return {
        "answer": "C",
        "all_choices": ["A", "B", "C"],
        "index2ans": {"A": "High", "B": "Medium", "C": "Low"},
    }


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("C", "C"),
        ("(C)", "C"),
        ("C.", "C"),  # "." stripped from the end, then "C "
        ("C. Low", "C"),  # the "{X}." stage (MMMU's parser would draw at random)
        ("DATA", "A"),  # "A " (no leading space) inside " DATA "
        ("A B", "B"),  # several: the last " X " wins (lmms-eval: NameError on `np`)
        ("XA YB", "A"),  # "A " and "B " match, no " X ": all rfind -1, argmax keeps the first
        ("The lighting here is rather low overall", "C"),  # > 5 words: option text
        ("I would rate it between medium and low", "C"),  # the later option text wins
    ],
)
def test_parse(output, expected):
    assert qbench.parse(output, _meta(), rng=random.Random(0)) == expected


def test_unparsed_draws_from_the_seeded_generator():
    assert qbench.parse("", _meta(), rng=random.Random(42)) == random.Random(42).choice("ABC")
    assert qbench.parse("", _meta()) == random.Random(0).choice("ABC")  # no file: seed 0


RECORD = {
    "id": 0,
    "image": "q.jpg",
    "question": "Is it blurry?",
    "option0": "Yes",
    "option1": "No",
    "option2": "N/A",
    "option3": "Maybe",  # after the first "N/A": not an option (q_bench_process_results breaks)
    "correct_choice": "B",
    "question_type": 0,
    "question_concern": 1,
}


def test_read_and_score(write_records):
    [s] = qbench.read(write_records([RECORD], media=("q.jpg",)))
    assert s.meta["all_choices"] == ["A", "B"]
    assert (s.meta["question_type"], s.meta["question_concern"]) == ("Yes/No", "Global Others")
    assert s.turns[0].parts[-1] == (
        "Is it blurry?\nA. Yes\nB. No\n\nAnswer with the option's letter from the given choices directly."
    )
    bad = {**RECORD, "correct_choice": 3}  # index beyond the 2 real options
    with pytest.raises(BadRecordError, match="correct_choice 3"):
        qbench.read(write_records([bad], media=("q.jpg",)))
    with pytest.raises(BadRecordError, match="concern 7"):
        qbench.read(write_records([{**RECORD, "question_concern": 7}], media=("q.jpg",)))


def test_read_llvisionqa_json(write_records):
    rec = {"img_path": "q.jpg", "question": "How is the focus?", "candidates": ["Good", "Poor"],
           "correct_ans": "Poor", "type": 1, "concern": 2}  # fmt: skip
    [s] = qbench.read(write_records([rec], media=("q.jpg",)))
    assert s.meta["answer"] == "B"
    assert s.meta["index2ans"] == {"A": "Good", "B": "Poor"}
    assert (s.meta["question_type"], s.meta["question_concern"]) == ("How", "Local Distortion")


def test_qbench_breakdown():
    # Yes/No + Global Distortion: 2 of 3 right; How + Local Others: 0 of 1 -> overall 2/4
    metas = [
        {"answer": "A", "question_type": "Yes/No", "question_concern": "Global Distortion"}
    ] * 3 + [{"answer": "B", "question_type": "How", "question_concern": "Local Others"}]
    metric = QBenchAccuracy()
    metric.update(["A", "A", "B", "A"], metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["accuracy"] == pytest.approx(50.0)  # lmms-eval's Overall, not the mean of groups
    assert out["Yes/No"] == pytest.approx(200 / 3)
    assert out["Global Distortion"] == pytest.approx(200 / 3)
    assert out["How"] == out["Local Others"] == 0.0
    assert "What" not in out and "Global Others" not in out
