from __future__ import annotations

from pathlib import Path

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.runner import Task
from lmm.evaluation.tasks import mme
from lmm.evaluation.tasks.mme import MMEScore


@pytest.mark.parametrize(
    ("output", "official", "lmms"),
    [
        ("yes", "yes", "yes"),
        ("Yes", "yes", "yes"),
        ("Yes.", "yes", "yes"),
        ("No, it is not.", "no", "no"),
        ("   yes", "other", "yes"),  # official does not strip
        ("y", "other", "yes"),
        ("n", "other", "no"),
        ("Nope", "no", "no"),  # "no" in the first 4 characters
        ("Not sure", "no", "no"),
        ("Answer: yes", "other", "other"),
        ("", "other", "other"),
        ("yes " * 300, "yes", "yes"),
        ("Sí", "other", "other"),
    ],
)
def test_parse(output, official, lmms):
    assert mme.parse(output) == official
    assert mme.parse(output, mode="lmms_eval") == lmms


def test_acc_plus_needs_both_questions():
    # existence: image 0 both right, image 1 one right -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125
    # code_reasoning: image 2 both right -> 100 + 100 = 200; "other" is wrong -> image 3: 50 + 0
    metric = MMEScore()
    metas = [
        {"category": "existence", "pair_id": 0, "answer": "yes"},
        {"category": "existence", "pair_id": 0, "answer": "no"},
        {"category": "existence", "pair_id": 1, "answer": "yes"},
        {"category": "existence", "pair_id": 1, "answer": "no"},
        {"category": "code_reasoning", "pair_id": 2, "answer": "yes"},
        {"category": "code_reasoning", "pair_id": 2, "answer": "no"},
        {"category": "text_translation", "pair_id": 3, "answer": "yes"},
        {"category": "text_translation", "pair_id": 3, "answer": "no"},
    ]
    preds = ["yes", "no", "yes", "yes", "yes", "no", "other", "no"]
    metric.update(preds, metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["existence/acc"] == pytest.approx(75.0)
    assert out["existence/acc_plus"] == pytest.approx(50.0)
    assert out["existence/score"] == pytest.approx(125.0)
    assert out["code_reasoning/score"] == pytest.approx(200.0)
    assert out["text_translation/score"] == pytest.approx(50.0)
    assert out["perception"] == pytest.approx(125.0)
    assert out["cognition"] == pytest.approx(250.0)


def test_read_pairs_and_prompt(write_records):
    recs = [
        {
            "question_id": "artwork/1.jpg",
            "image": "artwork/1.jpg",
            "question": "Is this by Monet? Please answer yes or no.",
            "answer": "Yes",
            "category": "artwork",
        },
        {
            "question_id": "artwork/1.jpg",
            "image": "artwork/1.jpg",
            "question": "Is this by Dali? Please answer yes or no.",
            "answer": "No",
            "category": "artwork",
        },
        {
            "question_id": "OCR/2.jpg",
            "image": "OCR/2.jpg",
            "question": "Is it 'café'? Please answer yes or no.",
            "answer": "No",
            "category": "OCR",
        },
    ]
    path = write_records(recs, "mme.jsonl", media=("artwork/1.jpg", "OCR/2.jpg"))
    samples = mme.read(path)
    assert [s.meta["pair_id"] for s in samples] == [0, 0, 1]
    assert (
        samples[0].turns[0].parts[-1]
        == "Is this by Monet?\nAnswer the question using a single word or phrase."
    )
    assert samples[2].meta["answer"] == "no"


def test_read_unknown_subtask(write_records):
    path = write_records(
        [
            {
                "question_id": "x/1.jpg",
                "image": "1.jpg",
                "question": "q",
                "answer": "Yes",
                "category": "x",
            }
        ],
        media=("1.jpg",),
    )
    with pytest.raises(BadRecordError, match="unknown MME subtask 'x'"):
        mme.read(path)


def test_mme_breakdown():
    # Every subtask of the parity fixture has its acc, acc+ and score in the results, and the
    # totals are the sums of the subtask scores (as calculation.py prints them).
    folder = Path(__file__).resolve().parents[1] / "fixtures/official/mme"
    task = Task("mme", str(folder / "mme.jsonl"), check_media=False)
    samples = task.samples()
    task.metric.update(["yes"] * len(samples), [s.meta for s in samples])
    out = task.compute()
    for name in mme.PERCEPTION + mme.COGNITION:
        assert out[f"{name}/score"] == pytest.approx(out[f"{name}/acc"] + out[f"{name}/acc_plus"])
    # "yes" to both questions of an image: one right each, so acc 50 and acc+ 0 everywhere.
    assert {out[f"{n}/acc"] for n in mme.PERCEPTION + mme.COGNITION} == {50.0}
    assert out["perception"] == pytest.approx(500.0) and out["cognition"] == pytest.approx(200.0)


def test_repeated_question_ids_become_unique_sample_ids(write_records):
    recs = [
        {"question_id": "OCR/1.jpg", "image": "OCR/1.jpg", "question": q, "answer": a,
         "category": "OCR"}
        for q, a in (("Is it A?", "Yes"), ("Is it B?", "No"))
    ]  # fmt: skip
    samples = mme.read(write_records(recs, "mme.jsonl"), check_media=False)
    assert [s.id for s in samples] == ["OCR/1.jpg#0", "OCR/1.jpg#1"]
    assert samples[0].meta["pair_id"] == samples[1].meta["pair_id"]
