from __future__ import annotations

import pytest

from lmm.data.sample import BadRecordError, Media
from lmm.evaluation.tasks import mantis_eval, nlvr2
from lmm.evaluation.tasks.mantis_eval import MantisAccuracy, is_correct

MC = {"question_type": "multi-choice", "answer": "B", "options": ["dog", "cat", "bird"]}


@pytest.mark.parametrize(
    ("output", "parsed", "correct"),
    [
        ("B", "B", True),
        ("(B)", "B", True),
        ("B. cat", "B", True),
        ("The answer is B.", "B", True),
        ("Final Answer: (B)", "B", True),
        ("Answer: B", "B", True),
        ("cat", "C", False),  # first letter "c" is a valid option: read as C
        ("dog", "dog", False),  # "D" is not among 3 options: the raw text is compared with "cat"
        ("  cat ", "C", False),
        ("zebra", "zebra", False),
        ("", "", False),
        ("123", "123", False),
        ("Écrit", "Écrit", False),  # "É" is a letter but no option
    ],
)
def test_multi_choice(output, parsed, correct):
    assert mantis_eval.parse(output, MC) == parsed
    assert is_correct(mantis_eval.parse(output, MC), MC) is correct


def test_raw_text_matches_option_when_no_letter():
    meta = {"question_type": "multi-choice", "answer": "(A)", "options": ["1 zebra", "2 zebras"]}
    # First letter "z" is no option: the raw text must equal the gold option text.
    assert mantis_eval.parse("1 zebra", meta) == "1 zebra"
    assert is_correct("1 zebra", meta)
    assert not is_correct("2 zebras", meta)
    # ...but "1 apple" would be read as the letter A (first alphabetic character).
    assert mantis_eval.parse("1 apple", meta) == "A"
    labelled = {"question_type": "multi-choice", "answer": "A", "options": ["A. 12", "B. 13"]}
    assert is_correct("12", labelled)


def test_short_answer():
    meta = {"question_type": "short-answer", "answer": "Two", "options": []}
    assert mantis_eval.parse("Let me count. Final Answer: two", meta) == "two"
    assert is_correct("two", meta)
    assert not is_correct("2", meta)


def test_nlvr2_true_false_fallback():
    meta = {"question_type": "multi-choice", "answer": "A", "options": ["True", "False"]}
    # "The statement is true" -> first letter "T", not an option -> keyword rule
    assert nlvr2.parse("The statement is true", meta) == "The statement is true"
    assert is_correct("The statement is true", meta, nlvr2=True)
    assert not is_correct("The statement is true", meta)
    assert not is_correct("true or false", meta, nlvr2=True)
    metric = nlvr2.NLVR2Accuracy()
    metric.update(["A", "false", "B"], [meta] * 3)  # right, wrong, wrong
    assert float(metric.compute()["accuracy"]) == pytest.approx(100 / 3)


def test_accuracy_by_type():
    metric = MantisAccuracy()
    short = {"question_type": "short-answer", "answer": "red", "options": []}
    metric.update(["B", "C", "Red"], [MC, MC, short])
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["accuracy"] == pytest.approx(200 / 3)
    assert out["multi-choice"] == pytest.approx(50.0)
    assert out["short-answer"] == pytest.approx(100.0)


def test_read(write_records, tmp_path):
    recs = [
        {
            "id": "m1",
            "question_type": "multi-choice",
            "question": "<image> vs <image>: which is bigger?",
            "options": ["left", "B: right"],
            "answer": "B",
            "images": ["i/1.png", "i/2.png"],
            "category": "size",
            "data_source": "x",
        }
    ]
    path = write_records(recs, media=("i/1.png", "i/2.png"))
    [s] = mantis_eval.read(path)
    assert s.turns[0].parts == [
        Media(0),
        " vs ",
        Media(1),
        ": which is bigger?\n (A) left\n B: right\nAnswer with the option's letter from the given choices directly.",
    ]
    assert s.images == [tmp_path / "i/1.png", tmp_path / "i/2.png"]
    recs[0]["question"] = "which is bigger?"  # no markers: Mantis puts them first
    [s] = mantis_eval.read(write_records(recs, media=("i/1.png", "i/2.png")))
    assert s.turns[0].parts[:2] == [Media(0), Media(1)]


def test_read_bad_type(write_records):
    recs = [{"id": "m2", "question_type": "essay", "question": "q", "answer": "x"}]
    with pytest.raises(BadRecordError, match="question_type 'essay'"):
        mantis_eval.read(write_records(recs))


def test_gold_letter_case_kept_for_option_text():
    # Mantis compares the text after the gold option's label as written: gold "b", "b. small".
    meta = {"question_type": "multi-choice", "answer": "b", "options": ["a. large", "b. small"]}
    assert is_correct(mantis_eval.parse("small", meta), meta)
    assert is_correct(mantis_eval.parse("B", meta), meta)


def test_mantis_eval_breakdown():
    # Mantis's eval.py prints multi-choice, short-answer and overall accuracy.
    metric = MantisAccuracy()
    short = {"question_type": "short-answer", "answer": "2", "options": []}
    outputs = ["B", "cat", "dog", "2", " 2"]  # right, wrong, wrong, right, wrong (unstripped)
    metas = [MC, MC, MC, short, short]
    metric.update([mantis_eval.parse(o, m) for o, m in zip(outputs, metas, strict=True)], metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"accuracy": 40.0, "multi-choice": 100 / 3, "short-answer": 50.0})


def test_read_hub_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    png = b"\x89PNG\r\n\x1a\nfake"
    rows = [
        {
            "id": "m7",
            "question_type": "multi-choice",
            "question": "<image><image> Same dog?",
            "images": [{"bytes": png, "path": "a.png"}, {"bytes": png, "path": None}],
            "options": ["yes", "no"],
            "answer": "A",
            "data_source": "x",
            "category": "y",
        }
    ]
    shard = tmp_path / "mantis_eval" / "test-00000-of-00001.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), shard)
    [s] = mantis_eval.read(shard)
    folder = shard.parent / "test-00000-of-00001_images"
    assert s.images == [folder / "m7_0.png", folder / "m7_1.png"]
    assert s.images[0].read_bytes() == png
    assert s.meta["options"] == ["yes", "no"] and s.turns[0].parts[:2] == [Media(0), Media(1)]
