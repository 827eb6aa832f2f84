from __future__ import annotations

import json

import pytest

from lmm.data.sample import BadRecordError, Media
from lmm.evaluation.tasks import demon
from lmm.evaluation.tasks.demon import DemonScore, demon_score, process, rouge_l, tfidf_best


def test_process():
    assert process('"The Dog, barked!"') == "the dog barked"
    assert process("Image A.") == "image a"
    assert process("3.5 km") == "3.5 km"


def test_rouge_l():
    # ref {the, red, car} m=3, hyp {a, red, car} n=3, LCS {red, car}: P = R = 2/3, F = 2/3
    assert rouge_l("a red car", "the red car") == pytest.approx(2 / 3, abs=1e-6)
    # distinct-word counts: hyp "red red car" has n=2 -> P = 1, R = 2/3 -> F = 0.8
    assert rouge_l("red red car", "the red car") == pytest.approx(0.8, abs=1e-6)
    assert rouge_l("x", "the red car") == 0.0
    assert rouge_l("café au lait", "café au lait") == pytest.approx(1.0, abs=1e-6)


def test_tfidf_best():
    assert tfidf_best("a red car", ["blue car", "red apple", "red car"]) == 2
    assert tfidf_best("x", ["blue car", "red car"]) == 0  # zero vector: the first choice wins
    assert tfidf_best("", ["a", "b"]) is None  # no token of 2+ characters anywhere


def _meta(qtype, answer, choices=(), dataset="D1"):
    return {
        "question_type": qtype,
        "answer": answer,
        "choice_list": list(choices),
        "dataset": dataset,
    }


def test_scores():
    mc = _meta("multi-choice", "red car", ["blue car", "red car"])
    assert demon_score("It is the red car!", mc) == 1.0
    assert demon_score("blue", mc) == 0.0
    first_right = _meta("multi-choice", "blue car", ["blue car", "red car"])
    assert demon_score("", first_right) == 1.0  # empty output -> zero vector -> first choice
    one_letter = _meta("multi-choice", "b", ["a", "b"])
    assert demon_score("b", one_letter) == 1.0  # no vocabulary: exact equality fallback
    image = _meta("multi-choice", "Image B", ["Image A", "Image B"], dataset="COMICS_Panel")
    assert demon_score("image b is right", image) == 1.0
    assert demon_score("Image B, not image a", image) == 0.0  # two "image x"
    assert demon_score("", _meta("open-ended", "a red car")) == 0.0
    assert demon_score("A red car.", _meta("open-ended", "the red car")) == pytest.approx(
        2 / 3, abs=1e-6
    )


def test_misspelled_image_choice_list_is_the_default():
    meta = _meta("multi-choice", "image b", ["image a", "image b"], dataset="RecipeQA_VisualCloze")
    # Official: TF-IDF ("image" and "b"/"a" are 1-char, only "image" counts: tie -> first) -> wrong
    assert demon_score("image b", meta) == 0.0
    assert demon_score("image b", meta, demon.IMAGE_CHOICE_FIXED) == 1.0


def test_category_mean_of_datasets():
    # D1 (cat X): 1, 0 -> 50; D2 (cat X): 1 -> 100; D3 (cat Y): 0 -> 0
    # X = (50 + 100) / 2 = 75 (not the per-sample 66.7); average over categories = 37.5
    metric = DemonScore({"D1": "X", "D2": "X", "D3": "Y"})
    mc = _meta("multi-choice", "red car", ["blue car", "red car"])
    metas = [mc, mc, {**mc, "dataset": "D2"}, {**mc, "dataset": "D3"}]
    metric.update(["red car", "blue car", "red car", "blue car"], metas)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["dataset/D1"] == pytest.approx(50.0)
    assert out["category/X"] == pytest.approx(75.0)
    assert out["category/Y"] == pytest.approx(0.0)
    assert out["average"] == pytest.approx(37.5)


def _core(tmp_path, items, qtype="multi-choice"):
    folder = tmp_path / "Multi-Modal Cloze" / "COMICS_Panel" / "core"
    (folder / "images").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg"):
        (folder / "images" / name).touch()
    path = folder / "core.json"
    path.write_text(
        json.dumps(
            {"metadata": {"task_instruction": ["Pick one."], "question_type": qtype}, "data": items}
        )
    )
    return path


def test_read(tmp_path):
    item = {
        "sample_id": 0,
        "task_instruction_id": 0,
        "response": "image b",
        "task_instance": {
            "context": "Panel {image#1} then {image#2}?",
            "images_path": ["1.jpg", "2.jpg"],  # under core/images/, as Cheetah reads them
            "choice_list": ["image a", "image b"],
        },
    }
    [s] = demon.read(_core(tmp_path, [item]))
    assert s.meta["dataset"] == "COMICS_Panel"
    assert s.meta["category"] == "Multi-Modal Cloze"
    assert s.turns[0].parts == [
        "Pick one.Panel ",
        Media(0),
        " then ",
        Media(1),
        "?Choice list:['image a', 'image b']. Your answer is:",
    ]
    assert (
        s.images[1] == tmp_path / "Multi-Modal Cloze" / "COMICS_Panel" / "core" / "images" / "2.jpg"
    )


def test_read_tables_and_image_choice_without_choice_list(tmp_path):
    # MMCoQA-style {table#k} markers are images; COMICS_Panel items carry no choice_list.
    item = {
        "sample_id": 1,
        "response": "Image B",
        "task_instance": {"context": "{table#1} Q {image#2}", "images_path": ["1.jpg", "2.jpg"]},
    }
    [s] = demon.read(_core(tmp_path, [item]))
    assert s.turns[0].parts == ["Pick one.", Media(0), " Q ", Media(1)]
    assert s.meta["choice_list"] == []
    assert demon_score("image b", s.meta) == 1.0
    with pytest.raises(ValueError, match="TF-IDF"):
        demon_score("image b", {**s.meta, "dataset": "RecipeQA_TextCloze"})
    assert demon.dataset_categories([s]) == {"COMICS_Panel": "Multi-Modal Cloze"}


def test_read_gold_not_in_choices(tmp_path):
    item = {
        "sample_id": 3,
        "response": "image c",
        "task_instance": {"context": "x", "images_path": [], "choice_list": ["image a", "image b"]},
    }
    with pytest.raises(BadRecordError, match="'image c' is not in choice_list"):
        demon.read(_core(tmp_path, [item]))


def test_demon_breakdown():
    # Per dataset (mean x100) and per category as i4_score.dict_mean: mean of the datasets'
    # fractions rounded to 5 decimals, x100. D1 = 1/3, D2 = 0.1234567 -> X = round(0.2283950, 5)
    metric = DemonScore({"D1": "X", "D2": "X", "D3": "Y"})
    mc = _meta("multi-choice", "red car", ["blue car", "red car"])
    metric.update(["red car", "blue car", "blue"], [mc] * 3)
    metric.sums[1], metric.counts[1] = 0.1234567, 1  # a soft (ROUGE-L) dataset mean
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["dataset/D1"] == pytest.approx(100 / 3)
    assert out["dataset/D2"] == pytest.approx(12.34567)
    assert out["category/X"] == round((1 / 3 + 0.1234567) / 2, 5) * 100  # 22.84 exactly as printed
    assert "category/Y" not in out and out["average"] == out["category/X"]
