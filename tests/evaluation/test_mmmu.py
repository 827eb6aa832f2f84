from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.tasks import mmmu
from lmm.evaluation.tasks._choices import mmmu_choice
from lmm.evaluation.tasks.mmmu import MMMUAccuracy, eval_open, parse_open

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "mmmu"
INDEX2ANS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
CHOICES = list(INDEX2ANS)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),  # "." stripped from the end -> " B "
        ("The answer is (C).", "C"),
        ("(A) or maybe (B)", "B"),  # last occurrence wins
        ("A or B", "B"),
        ("I think the animal in the picture is a fish", "D"),  # > 5 words: option text
        ("USA is big", None),  # no " A ": random fallback
        ("D. fish", None),  # official has no "X." stage: random fallback
        ("", None),
    ],
)
def test_multi_choice_parse(output, expected):
    got = mmmu_choice(output, CHOICES, INDEX2ANS, random.Random(42))
    if expected is None:
        assert got == random.Random(42).choice(CHOICES)
    else:
        assert got == expected


def test_random_fallback_is_seeded_like_the_official_module():
    rng = random.Random(42)
    draws = [mmmu_choice("???", CHOICES, INDEX2ANS, rng) for _ in range(5)]
    random.seed(42)  # what eval_utils.py does at import
    assert draws == [random.choice(CHOICES) for _ in range(5)]


def test_open_parse_and_eval():
    # "the answer is 3.14159" -> key "3.14159" -> a number, rounded to 2 dp (deduplicated)
    assert parse_open("The answer is 3.14159.") == [3.14]
    assert parse_open("So the color is Red") == ["red"]
    assert eval_open("3.14", parse_open("The answer is 3.14159."))
    assert eval_open("1000", parse_open("so the total = 1,000"))
    assert eval_open("Paris", parse_open("I believe it is Paris, France"))
    assert not eval_open("Paris", parse_open(""))
    assert eval_open(["24", "twenty-four"], parse_open("twenty-four"))
    assert not eval_open("a", parse_open("banana"))  # one-letter gold is padded with spaces
    assert eval_open("café", parse_open("It is Café"))


def test_mmmu_breakdown():
    metas = [
        {"question_type": "multiple-choice", "answer": "B", "subject": "Art"},
        {"question_type": "multiple-choice", "answer": "A", "subject": "Art"},
        {"question_type": "open", "answer": "42", "subject": "Math"},
    ]
    metric = MMMUAccuracy()
    metric.update(["B", "C", parse_open("x = 42")], metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["accuracy"] == pytest.approx(200 / 3)  # 2 of 3 (not the mean of 50 and 100)
    assert out["Art"] == pytest.approx(50.0)
    assert out["Math"] == pytest.approx(100.0)
    # main_eval_only.py's domain rows, instance-weighted over the domain's subjects
    assert out["Overall-Art and Design"] == pytest.approx(50.0)
    assert out["Overall-Science"] == pytest.approx(100.0)
    assert "Overall-Business" not in out  # no sample


def test_each_read_draws_its_own_fallbacks(write_records):
    recs = [
        {"id": f"validation_Art_{i}", "question": "q", "options": ["x", "y", "z", "w"],
         "answer": "A", "question_type": "multiple-choice"}
        for i in range(6)
    ]  # fmt: skip
    path = write_records(recs)
    first = [mmmu.parse("???", s.meta) for s in mmmu.read(path)]
    again = [mmmu.parse("???", s.meta) for s in mmmu.read(path)]
    official = random.Random(42)  # eval_utils.py: random.seed(42), then draws in parse order
    assert first == again == [official.choice(CHOICES) for _ in range(6)]
    other = [mmmu.parse("???", s.meta, seed=0) for s in mmmu.read(path)]
    zero = random.Random(0)
    assert other == [zero.choice(CHOICES) for _ in range(6)]


def test_open_candidates_equal_the_official_set():
    # The official parse_open_response returns list(set(...)); the fixture keeps it as made.
    fixture = json.loads((FIXTURES / "official.json").read_text())
    task = {s.id: s for s in mmmu.read(FIXTURES / fixture["data"], check_media=False)}
    opens = [c for c in fixture["cases"] if "official_parsed" in c]
    assert len(opens) >= 20
    for case in opens:
        got = mmmu.parse(case["output"], task[case["id"]].meta)
        assert len(got) == len(set(got))
        assert set(got) == set(case["official_parsed"]), case["output"]


def test_read(write_records):
    recs = [
        {
            "id": "validation_Art_Theory_1",
            "question": "<image 1> Who painted it?",
            "options": "['Monet', 'Dali']",
            "answer": "A",
            "question_type": "multiple-choice",
            "image_1": "a.png",
            "image_2": None,
        },
        {
            "id": "validation_Math_2",
            "question": "2+2?",
            "options": "[]",
            "answer": "4",
            "question_type": "open",
            "image_1": "b.png",
        },
    ]
    path = write_records(recs, media=("a.png", "b.png"))
    mc, op = mmmu.read(path)
    assert mc.meta["subject"] == "Art_Theory"
    assert mc.meta["index2ans"] == {"A": "Monet", "B": "Dali"}
    assert mc.turns[0].parts[-1] == (
        "<image 1> Who painted it?\n\n(A) Monet\n(B) Dali\n\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert op.turns[0].parts[-1] == "2+2?\n\nAnswer the question using a single word or phrase."
    assert mmmu.parse("four is 4", op.meta) == [4.0]
    lmms = mmmu.read(path, style="lmms_eval")[0]
    assert (
        lmms.turns[0].parts[-1].startswith("<image 1> Who painted it?\nA. Monet\nB. Dali\n\nAnswer")
    )


def test_read_bad_answer(write_records):
    recs = [
        {
            "id": "validation_Art_3",
            "question": "q",
            "options": ["x", "y"],
            "answer": "E",
            "question_type": "multiple-choice",
        }
    ]
    with pytest.raises(BadRecordError, match="answer 'E' not among 2 options"):
        mmmu.read(write_records(recs))
