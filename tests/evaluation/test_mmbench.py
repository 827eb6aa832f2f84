from __future__ import annotations

from pathlib import Path

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
        ("A dog is shown", "A"),  # the "A is a quantifier" rejection needs VERBOSE set
        ("A day is shown, A", ""),  # one letter, but its first occurrence is not in the last 4
        ("C because A is wrong", ""),  # two letters, no "answer is X"
        ("A dog is next to it, so the answer is C", "C"),  # two letters, then "answer is X"
        ("answer is b", "B"),  # the "answer is X" rule ignores case
        ("The answer is a fish", "A"),  # ... and reads the article "a" as A
        ("B is right, the others are all wrong", ""),  # the letter is not among the last 4 tokens
        ("It is a cat", "B"),  # no letter: the option text matches once
        ("It is a cat, surely a cat, nothing but a cat!!", ""),  # > 2x the options' text
        ("Cannot determine the answer", "Z"),
        ("Z", "Z"),
        ("", ""),
        ("B " * 500, ""),  # B is not among the last four tokens
        ("\uff22", ""),
    ],
)
def test_parse(output, expected):
    # Each expectation is what VLMEvalKit's `can_infer` (e8e78f0) returned for it.
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


FIXTURE_TSV = Path(__file__).resolve().parents[1] / "fixtures/official/mmbench/mmbench_dev_en.tsv"


def test_read_vlmevalkit_tsv_decodes_images_once(tmp_path):
    # The official layout: base64 image on the original, its index on each circular copy.
    samples = mmbench.read(FIXTURE_TSV, tmp_path / "images")
    by_id = {s.id: s for s in samples}
    assert len(samples) == 41 and by_id["1000001"].meta["group"] == 1
    assert by_id["1"].images == by_id["3000001"].images == [tmp_path / "images/1.png"]
    assert (tmp_path / "images/1.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "images").iterdir())[:2] == ["1.png", "10.png"]
    # Missing C/D cells are NaN in pandas: a two-option question has two choices.
    assert by_id["1000004"].meta["choices"] == {"A": "right", "B": "left"}
    assert by_id["2"].meta["l2_category"] == "coarse_perception"
    assert by_id["2"].turns[0].parts[-1].startswith("The photo was taken in summer.\nWhich scene")


def test_read_tsv_without_check_writes_nothing(tmp_path):
    samples = mmbench.read(FIXTURE_TSV, tmp_path / "images", check_media=False)
    assert samples[0].images == [tmp_path / "images/1.png"]
    assert not (tmp_path / "images").exists()


def test_tsv_row_without_image_is_skipped(tmp_path):
    # VLMEvalKit's ImageBaseDataset (skip_noimg) drops rows whose image cell is empty.
    lines = FIXTURE_TSV.read_text().splitlines()
    header = lines[0].split("\t")
    row = lines[1].split("\t")
    row[header.index("index")] = "99"
    row[header.index("image")] = ""
    path = tmp_path / "m.tsv"
    path.write_text("\n".join([*lines[:2], "\t".join(row)]) + "\n")
    assert [s.id for s in mmbench.read(path, check_media=False)] == ["1"]


def test_read_hub_copy_spelling_and_text_only_records(write_records):
    # lmms-lab's hub copy spells `L2-category`; a record without `image` is a text-only sample.
    rec = {
        "index": 5,
        "question": "Which is a fruit?",
        "hint": "nan",
        "A": "apple",
        "B": "stone",
        "C": "nan",
        "D": "nan",
        "answer": "A",
        "category": "ocr",
        "L2-category": "finegrained_perception (instance-level)",
    }
    [sample] = mmbench.read(write_records([rec], "mmbench.jsonl"))
    assert sample.images == [] and sample.meta["l2_category"] == rec["L2-category"]
    assert sample.turns[0].parts == [
        "Which is a fruit?\nA. apple\nB. stone\n"
        "Answer with the option's letter from the given choices directly."
    ]


def test_vlmevalkit_prompt_is_build_prompt():
    text = mmbench.prompt("Q?", ["x", "y"], "H", style="vlmevalkit")
    assert text == (
        "Hint: H\nQuestion: Q?\nOptions:\nA. x\nB. y\n"
        "Please select the correct answer from the options above. \n"
    )


def test_mmbench_breakdown():
    # Two image_topic groups (one hit, one miss), one ocr group (hit); L2: CP has both topics.
    # The copy's own category is not used: a group counts under its original's category.
    metric = MMBenchCircular(["image_topic", "ocr"], ["CP", "FP-S"])
    metas, preds = [], []
    for group, cat, l2, right in ((1, "image_topic", "CP", True), (2, "image_topic", "CP", False),
                                  (3, "ocr", "FP-S", True)):  # fmt: skip
        for k in range(2):
            metas.append(
                {"group": group, "index": group + k * 1_000_000, "answer": "AB"[k],
                 "category": cat, "l2_category": l2}
            )  # fmt: skip
            preds.append("AB"[k] if right or k == 0 else "A")
    metric.update(preds, metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["circular"] == pytest.approx(200 / 3)
    assert out["category/image_topic"] == pytest.approx(50.0)
    assert out["category/ocr"] == pytest.approx(100.0)
    assert out["l2_category/CP"] == pytest.approx(50.0)
    assert out["l2_category/FP-S"] == pytest.approx(100.0)
    assert out["vanilla"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown category 'scene'"):
        metric.update(["A"], [{**metas[0], "category": "scene"}])


def test_group_without_its_original_is_not_counted():
    # VLMEvalKit iterates the original copies: copies alone make no group.
    metric = MMBenchCircular()
    metric.update(["A", "B"], [{"group": 1, "index": 1, "answer": "A"},
                               {"group": 2, "index": 1_000_002, "answer": "A"}])  # fmt: skip
    assert float(metric.compute()["circular"]) == pytest.approx(100.0)
