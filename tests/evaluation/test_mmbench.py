from __future__ import annotations

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.tasks import mmbench
from lmm.evaluation.tasks.mmbench import MMBenchCircular

CHOICES = {"A": "a dog", "B": "a cat", "C": "a bird", "D": "a fish"}


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B. a cat", "B"),
        ("The answer is B.", "B"),
        ("b", ""),  # letters are case-sensitive; "b" is no option text either
        ("A day is shown, A", ""),  # "A" may be the article: rejected
        ("C because A is wrong", ""),  # two letters
        ("It is a cat", "B"),  # no letter: the option text matches once
        ("Cannot determine the answer", "Z"),
        ("", ""),
        ("B " * 500, "B"),
        ("Ｂ", ""),
    ],
)
def test_parse(output, expected):
    assert mmbench.parse(output, {"choices": CHOICES}) == expected


def test_circular_group_with_one_wrong_rotation_scores_zero():
    # group 1: 4 rotations all right -> hit; group 2: rotation k=2 wrong -> miss. circular 1/2.
    # vanilla looks at the original copies only (index < 1e6): both right -> 100.
    metric = MMBenchCircular()
    metas, preds = [], []
    for group, wrong_k in ((1, None), (2, 2)):
        for k in range(4):
            metas.append({"group": group, "index": group + k * 1_000_000, "answer": "ABCD"[k]})
            preds.append("ABCD"[(k + (k == wrong_k)) % 4])
    metric.update(preds, metas)
    out = metric.compute()
    assert float(out["circular"]) == pytest.approx(50.0)
    assert float(out["vanilla"]) == pytest.approx(100.0)


def test_read_with_circular_copies(write_records):
    rec = {
        "index": 3,
        "question": "What is it?",
        "hint": "nan",
        "A": "dog",
        "B": "cat",
        "C": "nan",
        "answer": "B",
        "category": "attribute",
        "image": "3.jpg",
    }
    path = write_records([rec], media=("3.jpg",))
    samples = mmbench.read(path, circular=True)
    assert [s.id for s in samples] == ["3", "1000003"]
    assert samples[1].meta["choices"] == {"A": "cat", "B": "dog"}
    assert [s.meta["answer"] for s in samples] == ["B", "A"]
    assert samples[0].turns[0].parts[-1] == (
        "What is it?\nA. dog\nB. cat\nAnswer with the option's letter from the given choices directly."
    )
    assert {s.meta["group"] for s in samples} == {3}


def test_read_bad_answer(write_records):
    rec = {"index": 4, "question": "q", "A": "x", "B": "y", "answer": "C", "image": "4.jpg"}
    path = write_records([rec], media=("4.jpg",))
    with pytest.raises(BadRecordError, match="answer 'C' is not one of the options"):
        mmbench.read(path)
