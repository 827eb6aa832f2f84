from __future__ import annotations

import json

import pytest

from lmm.data.sample import BadRecordError
from lmm.evaluation.runner import Task
from lmm.evaluation.tasks import pope
from lmm.evaluation.tasks.pope import POPEMetrics


@pytest.mark.parametrize(
    ("output", "official", "lmms"),
    [
        ("Yes", "yes", "yes"),
        ("Yes.", "yes", "yes."),
        ("yes,", "yes", "yes,"),
        ("No", "no", "no"),
        ("No, there is no dog.", "no", "no, there is no dog."),
        ("There is not a dog.", "no", "there is not a dog."),
        ("Yes. But no cat.", "yes", "yes. but no cat."),  # only the first sentence counts
        ("NO", "yes", "no"),  # official keywords are case-sensitive
        ("Nope", "yes", "nope"),
        ("Not sure", "yes", "not sure"),  # "Not" is not "not"
        ("I don't think so", "yes", "i don't think so"),
        ("", "yes", ""),
        ("no\nway", "yes", "no\nway"),  # split on single spaces only
        ("no\n", "no", "no"),  # LLaVA's answer file holds the stripped generation
        ("Non, café", "yes", "non, café"),
    ],
)
def test_parse(output, official, lmms):
    assert pope.parse(output) == official
    assert pope.parse(output, mode="lmms_eval") == lmms


def test_confusion_matrix_official():
    # gold: yes, yes, no, no; pred: yes, no, yes, no -> TP=1 FN=1 FP=1 TN=1
    # acc 2/4 = 50, precision 1/2 = 50, recall 1/2 = 50, F1 50, yes-ratio 2/4 = 50
    # second split "random": gold yes, yes, yes, no; pred yes, yes, no, no
    # -> TP=2 FN=1 TN=1: acc 75, precision 2/2 = 100, recall 2/3, F1 = 2*1*(2/3)/(5/3) = 0.8
    metric = POPEMetrics()
    metric.update(
        ["yes", "no", "yes", "no"] + ["yes", "yes", "no", "no"],
        [{"answer": a, "category": "adversarial"} for a in ("yes", "yes", "no", "no")]
        + [{"answer": a, "category": "random"} for a in ("yes", "yes", "yes", "no")],
    )
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["adversarial/accuracy"] == pytest.approx(50.0)
    assert out["adversarial/precision"] == pytest.approx(50.0)
    assert out["adversarial/f1"] == pytest.approx(50.0)
    assert out["adversarial/yes_ratio"] == pytest.approx(50.0)
    assert out["random/accuracy"] == pytest.approx(75.0)
    assert out["random/precision"] == pytest.approx(100.0)
    assert out["random/recall"] == pytest.approx(200 / 3)
    assert out["random/f1"] == pytest.approx(80.0)
    assert out["random/yes_ratio"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(65.0)
    assert "popular/f1" not in out


def test_lmms_eval_ignores_non_exact_and_counts_gold_yes():
    # gold yes, yes, no, no; raw outputs "Yes." (other), "yes", "no", "yes"
    # TP=1 FP=1 TN=1, other=1: acc 2/4 = 50; precision 1/2; recall 1/(1+0) = 100; yes-ratio gold 2/4
    metric = POPEMetrics(mode="lmms_eval")
    preds = [pope.parse(o, mode="lmms_eval") for o in ("Yes.", "yes", "no", "yes")]
    metric.update(preds, [{"answer": a, "category": "popular"} for a in ("yes", "yes", "no", "no")])
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["popular/accuracy"] == pytest.approx(50.0)
    assert out["popular/precision"] == pytest.approx(50.0)
    assert out["popular/recall"] == pytest.approx(100.0)
    assert out["popular/yes_ratio"] == pytest.approx(50.0)


def test_read_llava_format(write_records):
    recs = [
        {
            "question_id": 1,
            "image": "COCO_val2014_1.jpg",
            "text": "Is there a dog in the image?",
            "label": "Yes",
        }
    ]
    path = write_records(recs, "llava_pope_questions.jsonl", media=("COCO_val2014_1.jpg",))
    [s] = pope.read(path, category="random")
    assert s.meta == {"answer": "yes", "category": "random"}
    assert (
        s.turns[0].parts[-1]
        == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    with pytest.raises(BadRecordError, match="no 'category'"):
        pope.read(path)


def test_read_lmms_eval_format(write_records):
    recs = [
        {
            "question_id": "2",
            "question": "Is there a cat?",
            "image_source": "COCO_1",
            "category": "popular",
            "answer": "maybe",
        }
    ]
    path = write_records(recs, media=("COCO_1.jpg",))
    with pytest.raises(BadRecordError, match="'maybe' is not yes/no"):
        pope.read(path)


def test_read_published_split_files(tmp_path):
    # AoiDragon/POPE output/coco/coco_pope_<split>.json: JSON lines, ids restart in each file.
    for split in ("random", "popular"):
        rec = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "no"}
        (tmp_path / f"coco_pope_{split}.json").write_text(json.dumps(rec) + "\n" + json.dumps(rec))
    [s, _] = pope.read(tmp_path / "coco_pope_popular.json", check_media=False)
    assert (s.id, s.meta) == ("popular/1", {"answer": "no", "category": "popular"})
    task = Task("pope", str(tmp_path / "coco_pope_*.json"), check_media=False)
    assert [s.id for s in task.samples()] == ["popular/1", "popular/1", "random/1", "random/1"]


def test_pope_breakdown():
    outputs = ["Yes", "No", "Yes", "no", "maybe", "Yes"]
    golds = ["yes", "no", "no", "yes", "yes", "yes"]
    metas = [{"answer": g, "category": "random"} for g in golds]
    official, lmms = POPEMetrics(), POPEMetrics(mode="lmms_eval")
    official.update([pope.parse(o) for o in outputs], metas)  # "maybe" is read as yes
    lmms.update([pope.parse(o, mode="lmms_eval") for o in outputs], metas)
    out = {k: float(v) for k, v in official.compute().items()}
    assert {k: out[f"random/{k}"] for k in ("tp", "fp", "tn", "fn")} == {
        "tp": 3, "fp": 1, "tn": 1, "fn": 1
    }  # fmt: skip
    assert out["f1"] == pytest.approx(100 * 0.75) and out["random/yes_ratio"] == pytest.approx(
        400 / 6
    )
    pooled = {k: float(v) for k, v in lmms.compute().items()}
    assert (pooled["random/tp"], pooled["random/fn"]) == (2, 1)  # "maybe" is neither
    assert pooled["accuracy"] == pytest.approx(50.0) and pooled["recall"] == pytest.approx(200 / 3)
