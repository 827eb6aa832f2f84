from __future__ import annotations

import json

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


def test_gqa_breakdown():
    def meta(qid, answer, structural, semantic, entailed=(), balanced=True, **kw):
        return {
            "question_id": qid, "answer": answer, "structural": structural, "semantic": semantic,
            "entailed": list(entailed), "balanced": balanced, "group": kw.get("group"),
            "detailed": kw.get("detailed"), "valid": kw.get("valid", ["yes", "no"]),
            "plausible": kw.get("plausible", ["yes"]),
        }  # fmt: skip

    metas = [
        meta("1", "yes", "verify", "attr", entailed=["2", "3"]),
        meta("2", "no", "verify", "attr", entailed=["1"]),
        meta("3", "red", "query", "attr", balanced=False),  # only entailed: not scored
        meta("4", "cat", "query", "cat", group="animal", valid=["cat", "dog"]),
        meta("5", "color", "compare", "attr", detailed="twoCommon", valid=[]),
    ]
    metric = GQAAccuracy()
    metric.update(["yes", "yes", "red", "dog", "shape"], metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["accuracy"] == pytest.approx(25.0)  # 1 of the 4 balanced
    assert (out["binary"], out["open"]) == pytest.approx((100 / 3, 0.0))
    assert out["structural/verify"] == pytest.approx(50.0) and out["semantic/cat"] == 0.0
    # "dog" is valid, not plausible; "shape" counts for a "Common" question whatever the lists
    assert out["validity"] == pytest.approx(100.0) and out["plausibility"] == pytest.approx(75.0)
    # question 1 is right; of its entailed, 2 is wrong and 3 right: 0.5
    assert out["consistency"] == pytest.approx(50.0)
    # one global group, gold {cat: 1}, predicted {dog: 1}: (0 - 1)^2 / 1 = 1, / 100
    assert out["distribution"] == pytest.approx(0.01)
    plain = GQAAccuracy()
    plain.update(["yes"], [{"answer": "yes"}])
    assert set(plain.compute()) == {"accuracy"}  # no fields, no breakdown


def test_read_official_questions_and_choices(tmp_path):
    questions = {
        "7": {"question": "Is it red?", "imageId": "n1", "answer": "no", "isBalanced": True,
              "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
              "groups": {"global": None, "local": "x"}, "entailed": ["8"]},
        "8": {"question": "What color?", "imageId": "n1", "answer": "blue", "isBalanced": False},
    }  # fmt: skip
    (tmp_path / "testdev_all_questions.json").write_text(json.dumps(questions))
    choices = {"7": {"valid": ["yes", "no"], "plausible": ["no"]}}
    (tmp_path / "testdev_all_choices.json").write_text(json.dumps(choices))
    path = tmp_path / "testdev_all_questions.json"
    [s] = gqa.read(path, choices="testdev_all_choices.json", check_media=False)
    assert s.meta["valid"] == ["yes", "no"] and s.meta["entailed"] == ["8"]
    assert (s.meta["structural"], s.meta["group"]) == ("verify", None)
    both = gqa.read(path, balanced_only=False, check_media=False)
    assert [(t.id, t.meta["balanced"]) for t in both] == [("7", True), ("8", False)]
