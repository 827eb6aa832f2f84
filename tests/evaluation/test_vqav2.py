from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmm.data.sample import BadRecordError, Media
from lmm.evaluation.tasks import textvqa, vqav2
from lmm.evaluation.tasks._normalize import evalai_answer, normalize_vqa, process_punctuation
from lmm.evaluation.tasks.vqav2 import VQAAccuracy, vqa_score

MIXED = ["dog", "dog"] + ["cat"] * 8  # the humans disagree: normalisation is on
UNANIMOUS_YES = ["yes"] * 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("a dog", "dog"),
        ("The Dog.", "dog"),
        ("yes,", "yes"),  # "," touches no space -> becomes a space, then split away
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),  # digit,digit: every mark is deleted, not spaced
        ("dont", "don't"),
        ("black-and-white", "black and white"),
        ("café", "café"),
        ("２", "２"),  # full-width digits are not number words: left alone
        ("", ""),
    ],
)
def test_normalize_vqa(text, expected):
    assert normalize_vqa(text) == expected


def test_process_punctuation_deletes_marks_next_to_spaces():
    # "(" touches a space -> deleted; ")" at the very end touches none -> becomes a space.
    assert process_punctuation("a (b)") == "a b "
    assert process_punctuation("x/y") == "x y"


def test_evalai_answer_splits_possessive():
    assert evalai_answer("Man's") == "man 's"
    assert evalai_answer("Yes, two dogs?") == "yes 2 dogs"


def test_leave_one_out_two_of_ten():
    # 2 humans said "dog". Leaving out one of them: 1 match -> 1/3 (2 subsets);
    # leaving out a "cat" human: 2 matches -> 2/3 (8 subsets). (2/3 + 16/3) / 10 = 0.6
    assert vqa_score("dog", MIXED) == pytest.approx(0.6)
    # 3 of 10: leave out a "dog" -> 2/3 (3x); leave out other -> 1 (7x): (2 + 7) / 10 = 0.9
    assert vqa_score("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_score("cat", MIXED) == pytest.approx(1.0)


def test_official_quirk_unanimous_answers_are_not_normalised():
    assert vqa_score("Yes", UNANIMOUS_YES) == 0.0
    assert vqa_score("yes.", UNANIMOUS_YES) == 0.0
    assert vqa_score("two", ["2"] * 10) == 0.0
    assert vqa_score("  yes\n", UNANIMOUS_YES) == 1.0  # whitespace is always cleaned
    # With disagreement both sides are normalised: "Two" == "2", "the dog" == "dog".
    assert vqa_score("Two", ["2"] * 9 + ["3"]) == pytest.approx(1.0)
    assert vqa_score("the dog", MIXED) == pytest.approx(0.6)


def test_lmms_eval_mode_always_normalises_the_prediction():
    assert vqa_score("Yes", UNANIMOUS_YES, mode="lmms_eval") == 1.0
    assert vqa_score("two", ["2"] * 10, mode="lmms_eval") == 1.0
    assert vqa_score("man's", ["man's"] * 10, mode="lmms_eval") == 1.0


def test_llava_pipeline_loses_possessives():
    # LLaVA's processor turns "man's" into "man 's" before the official metric.
    assert vqa_score(vqav2.parse("man's"), ["man's"] * 10) == 0.0
    assert vqa_score(vqav2.parse("Yes."), UNANIMOUS_YES) == 1.0
    assert vqa_score(vqav2.parse("Two"), ["2"] * 10) == 1.0
    assert vqav2.parse("  Yes \n", mode="raw") == "Yes"
    long = "yes " * 500
    assert vqa_score(vqav2.parse(long), UNANIMOUS_YES) == 0.0
    assert vqa_score(vqav2.parse(""), UNANIMOUS_YES) == 0.0


def test_metric_per_answer_type():
    metric = VQAAccuracy()
    metas = [
        {"answers": UNANIMOUS_YES, "answer_type": "yes/no"},
        {"answers": MIXED, "answer_type": "other"},
        {"answers": ["2"] * 10, "answer_type": "number"},
    ]
    metric.update(["yes", "dog", "two"], metas)  # 1, 0.6, 0 (quirk)
    out = metric.compute()
    assert float(out["accuracy"]) == pytest.approx(100 * 1.6 / 3)
    assert float(out["yes/no"]) == pytest.approx(100.0)
    assert float(out["other"]) == pytest.approx(60.0)
    assert float(out["number"]) == pytest.approx(0.0)


def test_metric_rejects_unknown_answer_type():
    with pytest.raises(ValueError, match="unknown group"):
        VQAAccuracy().update(["x"], [{"answers": ["x"], "answer_type": "color"}])


def test_read_vqav2(write_records, tmp_path):
    rec = {
        "question_id": 7,
        "question": "What animal?",
        "image": "val2014/1.jpg",
        "answers": [
            {"answer": "dog", "answer_confidence": "yes", "answer_id": k} for k in range(10)
        ],
        "answer_type": "other",
        "question_type": "what",
        "multiple_choice_answer": "dog",
    }
    path = write_records([rec], "q.jsonl", media=("val2014/1.jpg",))
    [s] = vqav2.read(path)
    assert s.id == "7"
    assert s.turns[0].parts == [
        Media(0),
        "\n",
        "What animal?\nAnswer the question using a single word or phrase.",
    ]
    assert s.images == [tmp_path / "val2014/1.jpg"]
    assert s.meta["answers"] == ["dog"] * 10
    assert s.meta["answer_type"] == "other"


def test_read_vqav2_bad_record(write_records):
    path = write_records([{"question_id": 8, "image": "x.jpg"}], media=("x.jpg",))
    with pytest.raises(
        BadRecordError, match=r"sample '8' \(.*data.json\): missing field 'question'"
    ):
        vqav2.read(path)


def test_textvqa_applies_processor_to_both_sides(write_records):
    metric = textvqa.TextVQAAccuracy()
    answers = ["Coca-Cola"] * 3 + ["coca cola"] * 7
    # EvalAI processor: "coca-cola" -> "coca cola" on both sides: all 10 match -> 1.0
    metric.update([textvqa.parse(" Coca Cola ")], [{"answers": answers}])
    assert float(metric.compute()["accuracy"]) == pytest.approx(100.0)
    path = write_records(
        [
            {
                "question_id": 1,
                "question": "Brand?",
                "image_id": "abc",
                "answers": answers,
                "ocr_tokens": ["coca"],
            }
        ],
        media=("abc.jpg",),
    )
    [s] = textvqa.read(path, with_ocr=True)
    assert s.turns[0].parts[-1] == (
        "Brand?\nReference OCR token: coca\nAnswer the question using a single word or phrase."
    )
    assert s.images[0].name == "abc.jpg"


def test_lmms_eval_mode_normalises_unanimous_answers_too():
    # vqav2_process_results normalises the answers whatever the humans said.
    assert vqa_score("t shirt", ["t-shirt"] * 10, mode="lmms_eval") == 1.0
    assert vqa_score("t shirt", ["t-shirt"] * 10) == 0.0


def test_vqav2_breakdown():
    metric = VQAAccuracy()
    metas = [
        {"answers": UNANIMOUS_YES, "answer_type": "yes/no", "question_type": "is this"},
        {"answers": MIXED, "answer_type": "other", "question_type": "what is the"},
        {"answers": ["2"] * 10, "answer_type": "number", "question_type": "how many"},
        {"answers": ["3"] * 10, "answer_type": "number", "question_type": "how many"},
    ]
    metric.update(["yes", "dog", "2", "three"], metas)  # 1, 0.6, 1, 0 (quirk)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx(
        {
            "accuracy": 100 * 2.6 / 4,
            "yes/no": 100.0,
            "other": 60.0,
            "number": 50.0,
            "question_type/is this": 100.0,
            "question_type/what is the": 60.0,
            "question_type/how many": 50.0,
        }
    )
    with pytest.raises(ValueError, match="unknown group 'question_type/how tall'"):
        metric.update(["1"], [{"answers": ["1"], "question_type": "how tall"}])


def test_read_official_questions_and_annotations(tmp_path):
    questions = {
        "data_subtype": "val2014",
        "questions": [{"image_id": 42, "question": "What animal?", "question_id": 420}],
    }
    answers = [{"answer": "dog", "answer_confidence": "yes", "answer_id": k} for k in range(10)]
    anns = {
        "annotations": [
            {
                "question_id": 420,
                "image_id": 42,
                "question_type": "what",
                "answer_type": "other",
                "answers": answers,
                "multiple_choice_answer": "dog",
            }
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    [s] = vqav2.read(tmp_path / "q.json", "images", annotations="a.json", check_media=False)
    assert s.id == "420"
    assert s.images == [Path("images/COCO_val2014_000000000042.jpg")]
    assert s.meta["answers"] == ["dog"] * 10
    assert (s.meta["answer_type"], s.meta["question_type"]) == ("other", "what")
    [t] = vqav2.read(tmp_path / "q.json", "images", check_media=False)  # test-dev: no answers
    assert t.meta["answers"] is None


def test_textvqa_reads_the_official_file(tmp_path):
    data = {
        "dataset_name": "textvqa",
        "data": [
            {"question": "what brand?", "image_id": "ab12", "question_id": 5, "answers": ["x"] * 10}
        ],
    }
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    [s] = textvqa.read(tmp_path / "TextVQA_0.5.1_val.json", "train_images", check_media=False)
    assert (s.id, s.images, s.meta["answers"]) == ("5", [Path("train_images/ab12.jpg")], ["x"] * 10)
