from __future__ import annotations

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.tasks import blink
from lmm.evaluation.tasks.blink import BLINKAccuracy

META = {"n_choices": 2, "answer": "(B)", "sub_task": "Counting"}


@pytest.mark.parametrize(
    ("output", "official", "lmms"),
    [
        ("B", "(B)", "(B)"),
        ("(B)", "(B)", "(B)"),
        ("(B) two", "(B)", "(B)"),
        ("The answer is (B)", "(B)", "(T)"),
        ("The answer is (B).", "", "(T)"),  # "(B)." is not the token "(B)"
        ("(A) or (B)", "", "(A)"),
        ("I compared (A) and (B).\n\nSo (B)", "(B)", "(I)"),  # last paragraph decides
        ("Point B", "", "(P)"),
        ("b", "", "(B)"),  # lmms-eval: case-insensitive, upper-cased
        (" b) two", "", "(B)"),  # lmms-eval strips first
        ("", "", ""),
        ("(B) " * 400, "(B)", "(B)"),
        ("（B）", "", ""),  # full-width brackets
    ],
)
def test_parse(output, official, lmms):
    assert blink.parse(output, META) == official
    assert blink.parse(output, META, mode="lmms_eval") == lmms


def test_blink_breakdown():
    # Counting: 1 of 1 right (100); Jigsaw: 1 of 3 right (33.3)
    # macro (official "Total", and lmms-eval's unweighted `blink` group) = 66.67; micro = 50
    metas = [META] + [{"answer": "(A)", "sub_task": "Jigsaw"}] * 3
    preds = ["(B)", "(A)", "(B)", ""]
    official, lmms = BLINKAccuracy(), BLINKAccuracy(mode="lmms_eval")
    for m in (official, lmms):
        m.update(preds, metas)
    out = official.compute()
    assert float(out["accuracy"]) == pytest.approx(200 / 3)
    assert float(out["micro"]) == pytest.approx(50.0)
    assert int(out["unparsed"]) == 1
    assert float(out["Counting"]) == 100.0
    assert float(out["Jigsaw"]) == pytest.approx(100 / 3)
    assert float(lmms.compute()["accuracy"]) == pytest.approx(200 / 3)


def test_read(write_records):
    recs = [
        {
            "idx": "val_Counting_1",
            "sub_task": "Counting",
            "question": "How many?",
            "choices": ["1", "2"],
            "answer": "(B)",
            "prompt": "How many?\n(A) 1\n(B) 2",
            "image_1": "c.png",
            "image_2": None,
        }
    ]
    [s] = blink.read(write_records(recs, media=("c.png",)))
    assert s.meta == {"answer": "(B)", "n_choices": 2, "sub_task": "Counting"}
    assert s.turns[0].parts[-1] == "How many?\n(A) 1\n(B) 2"
    recs[0]["answer"] = "(C)"
    with pytest.raises(BadRecordError, match=r"answer '\(C\)'"):
        blink.read(write_records(recs, media=("c.png",)))
