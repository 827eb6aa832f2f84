from __future__ import annotations

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.tasks import scienceqa
from lmm.evaluation.tasks.scienceqa import ScienceQAAccuracy

META3 = {"n_choices": 3, "answer": "B"}


@pytest.mark.parametrize(
    ("output", "llava", "lmms"),
    [
        ("B", "B", "B"),
        ("b", "", "B"),
        ("B.", "", "B"),  # LLaVA needs "X. " with length >= 3
        ("B. cat", "B", "B"),
        ("A.dog", "", "A"),
        ("B.\nBecause it is", "", "B"),
        ("(B)", "", ""),
        ("B)", "", ""),
        ("Answer: B", "", ""),
        ("The answer is B.", "B", ""),
        ("The answer is B!", "B", ""),  # the regex "." matches any character
        ("The answer is B", "", ""),  # ...but needs one
        ("…The answer is A.", "A", ""),
        ("The answer is A. The answer is B.", "", ""),  # two matches: failed
        ("D", "", ""),  # beyond 3 choices
        ("", "", ""),
        ("B" * 1000, "", ""),
        ("Ｂ", "", ""),  # full-width letter
    ],
)
def test_parse(output, llava, lmms):
    assert scienceqa.parse(output, META3) == llava
    assert scienceqa.parse(output, META3, mode="lmms_eval") == lmms


def test_accuracy():
    metric = ScienceQAAccuracy()
    outputs = ["B", "B.", "The answer is B.", "(B)"]
    metric.update([scienceqa.parse(o, META3) for o in outputs], [META3] * 4)
    assert float(metric.compute()["accuracy"]) == pytest.approx(50.0)  # 2 of 4


def test_read_problems_json(write_records):
    problems = {
        "5": {
            "question": "Which is a mammal?",
            "hint": "",
            "choices": ["frog", "dog"],
            "answer": 1,
            "image": "image.png",
            "subject": "natural science",
            "split": "test",
        },
        "6": {
            "question": "No image",
            "hint": "",
            "choices": ["a", "b"],
            "answer": 0,
            "image": None,
            "split": "test",
        },
        "7": {
            "question": "Train",
            "hint": "h",
            "choices": ["a", "b"],
            "answer": 0,
            "image": "image.png",
            "split": "train",
        },
    }
    path = write_records(problems, "problems.json", media=("5/image.png",))
    [s] = scienceqa.read(path, split="test")
    assert s.id == "5"
    assert s.images == [path.parent / "5/image.png"]  # images/<split>/<pid>/image.png
    assert s.meta == {
        "answer": "B", "n_choices": 2, "subject": "natural science", "has_image": True
    }  # fmt: skip
    assert s.turns[0].parts[-1] == (
        "Context: N/A\nWhich is a mammal?\nA. frog\nB. dog\n"
        "Answer with the option's letter from the given choices directly."
    )
    both = scienceqa.read(path, split="test", images_only=False)
    assert [(t.id, t.images, t.meta["has_image"]) for t in both][1] == ("6", [], False)
    assert [p for p in both[1].turns[0].parts if not isinstance(p, str)] == []


def test_scienceqa_breakdown():
    # LLaVA prints Accuracy over every question and IMG-Accuracy over those with an image.
    metric = ScienceQAAccuracy()
    metas = [
        {**META3, "has_image": True},
        {**META3, "has_image": True},
        {**META3, "has_image": False},
        {**META3, "has_image": False},
    ]
    metric.update(["B", "", "B", "B"], metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"accuracy": 75.0, "img_accuracy": 50.0})
    img_only = ScienceQAAccuracy()  # ScienceQA-IMG: accuracy is the IMG accuracy
    img_only.update(["B"], [{**META3, "has_image": True}])
    assert set(img_only.compute()) == {"accuracy"}


def test_read_bad_answer_index(write_records):
    path = write_records(
        [{"pid": "9", "question": "q", "choices": ["a", "b"], "answer": 2, "image": "i.png"}],
        media=("i.png",),
    )
    with pytest.raises(BadRecordError, match="answer index 2 but 2 choices"):
        scienceqa.read(path)
