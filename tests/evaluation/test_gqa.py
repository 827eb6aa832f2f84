from __future__ import annotations

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.tasks import gqa
from lmm.evaluation.tasks.gqa import GQAAccuracy, gqa_correct


@pytest.mark.parametrize(
    ("output", "llava"),
    [("Yes.", "yes"), ("  T-shirt \n", "t-shirt"), ("yes,", "yes,"), ("", ""), ("Café.", "café")],
)
def test_parse_llava(output, llava):
    assert gqa.parse(output) == llava


def test_official_vs_lmms_eval():
    assert not gqa_correct("Yes", "yes")
    assert not gqa_correct("yes,", "yes")
    assert gqa_correct("yes,", "yes", mode="lmms_eval")
    assert gqa_correct("tshirt", "t-shirt", mode="lmms_eval")
    assert not gqa_correct("２", "2", mode="lmms_eval")


def test_metric_modes():
    preds = ["yes", "yes,", "tshirt", "no"]
    metas = [{"answer": a} for a in ("yes", "yes", "t-shirt", "yes")]
    official, lmms = GQAAccuracy(), GQAAccuracy(mode="lmms_eval")
    official.update(preds, metas)
    lmms.update(preds, metas)
    assert float(official.compute()["accuracy"]) == pytest.approx(25.0)  # 1 of 4
    assert float(lmms.compute()["accuracy"]) == pytest.approx(75.0)  # 3 of 4


def test_read_gqa_object_format(write_records):
    path = write_records(
        {
            "201": {
                "question": "Is it red?",
                "imageId": "n1",
                "answer": "no",
                "fullAnswer": "No, it is not.",
            }
        },
        "testdev_balanced_questions.json",
        media=("n1.jpg",),
    )
    [s] = gqa.read(path)
    assert s.id == "201"
    assert s.images[0].name == "n1.jpg"
    assert s.meta["answer"] == "no"
    assert s.turns[0].parts[-1].startswith("Is it red?\nAnswer the question")


def test_read_gqa_missing_image(write_records):
    path = write_records([{"question_id": "5", "question": "q", "imageId": "gone", "answer": "a"}])
    with pytest.raises(BadRecordError, match="media not found"):
        gqa.read(path)
