"""Benchmarks in the Lightning loop: `lmm test` with eval recipes, tasks as val dataloaders, rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from lmm.cli import main
from lmm.data.batch import Batch
from lmm.data.sample import Media, Sample, Turn
from lmm.evaluation.runner import BENCHMARKS, Task
from tests.helpers import tiny_data, tiny_llava, tiny_llava_args

REPO = Path(__file__).resolve().parents[2]
EVAL_RECIPES = sorted((REPO / "recipes" / "eval").glob("*.yaml"))
TINY = REPO / "recipes" / "tiny" / "llava_synthetic.yaml"


# --- tiny benchmark files in each benchmark's published layout, at the recipes' paths -------


def _images(synthetic_data: Path, folder: Path, names: list[str]) -> None:
    """Copy synthetic shape images to `folder/name` (PIL reads a PNG whatever its suffix)."""
    pngs = sorted((synthetic_data / "images").glob("*.png"))
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pngs[i % len(pngs)], folder / name)


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_pope(data: Path, synthetic_data: Path) -> list[dict]:
    images = [f"COCO_val2014_{i:012d}.jpg" for i in range(6)]
    _images(synthetic_data, data / "coco/val2014", images)
    records = [
        {
            "question_id": i,
            "text": f"Is there a {'circle' if i % 2 else 'square'} in the image?",
            "image": name,
            "category": ("adversarial", "popular", "random")[i % 3],
            "label": "yes" if i % 2 else "no",
        }
        for i, name in enumerate(images)
    ]
    _jsonl(data / "pope/llava_pope_test.jsonl", records)
    return records


def write_llava_suite(data: Path, synthetic_data: Path) -> None:
    """Two or three records of each benchmark of recipes/eval/suite_llava.yaml."""
    write_pope(data, synthetic_data)
    _jsonl(
        data / "vqav2/vqav2_val.jsonl",
        [
            {
                "question_id": i,
                "question": "What colour is the shape?",
                "image": f"COCO_val2014_{i:012d}.jpg",
                "answers": ["red"] * 7 + ["blue"] * 3,
                "answer_type": "other",
            }
            for i in range(2)
        ],
    )
    _images(synthetic_data, data / "gqa/images", ["n1.jpg", "n2.jpg"])
    gqa = {
        f"q{i}": {"question": "Is it round?", "imageId": f"n{i}", "answer": "yes"} for i in (1, 2)
    }
    (data / "gqa/testdev_balanced_questions.json").write_text(json.dumps(gqa))
    _images(synthetic_data, data / "scienceqa/images", ["7/image.png", "8/image.png"])
    problems = {
        str(pid): {
            "question": "Which shape is shown?",
            "hint": "",
            "choices": ["circle", "square", "star"],
            "answer": 1,
            "image": f"{pid}/image.png",
            "split": "test",
            "subject": "natural science",
        }
        for pid in (7, 8)
    }
    problems["9"] = {**problems["7"], "image": None}  # not in the IMG subset
    (data / "scienceqa/problems.json").write_text(json.dumps(problems))
    _images(synthetic_data, data / "textvqa/train_images", ["t1.jpg", "t2.jpg"])
    _jsonl(
        data / "textvqa/textvqa_val.jsonl",
        [
            {
                "question_id": i,
                "question": "What is written?",
                "image_id": f"t{i}",
                "answers": ["stop"] * 10,
            }
            for i in (1, 2)
        ],
    )
    mme_root = data / "mme/MME_Benchmark_release_version"
    _images(synthetic_data, mme_root, ["color/a.png", "count/b.png"])
    _jsonl(
        data / "mme/mme.jsonl",
        [
            {
                "question_id": f"{c}/{n}",
                "image": f"{c}/{n}",
                "question": q,
                "answer": a,
                "category": c,
            }
            for c, n, q, a in [
                ("color", "a.png", "Is the shape red? Please answer yes or no.", "Yes"),
                ("color", "a.png", "Is the shape green? Please answer yes or no.", "No"),
                ("count", "b.png", "Is there one shape? Please answer yes or no.", "Yes"),
            ]
        ],
    )
    _images(synthetic_data, data / "mmbench/images", ["m1.png"])
    _jsonl(
        data / "mmbench/mmbench_dev_en.jsonl",
        [
            {
                "index": 1,
                "question": "Which shape is it?",
                "hint": "nan",
                "A": "circle",
                "B": "square",
                "C": "star",
                "answer": "B",
                "category": "shapes",
                "image": "m1.png",
            }
        ],
    )
    _images(synthetic_data, data / "mmmu/images", ["u1.png"])
    _jsonl(
        data / "mmmu/mmmu_validation.jsonl",
        [
            {
                "id": "validation_Art_1",
                "question": "<image 1> Which shape?",
                "options": ["circle", "square"],
                "answer": "A",
                "question_type": "multiple-choice",
                "image_1": "u1.png",
            },
            {
                "id": "validation_Math_2",
                "question": "How many sides has a square?",
                "options": [],
                "answer": "4",
                "question_type": "open",
            },
        ],
    )


def _model_args(tiny_assets) -> list[str]:
    return [
        *tiny_llava_args(tiny_assets),
        "--trainer.enable_progress_bar=false",
    ]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- tests ------------------------------------------------------------------------------------


def test_lmm_test_runs_a_benchmark_end_to_end(tiny_assets, synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = write_pope(Path("data/eval"), synthetic_data)
    recipe = REPO / "recipes/eval/pope.yaml"
    main(["test", f"--config={TINY}", f"--config={recipe}", *_model_args(tiny_assets)])
    [results_file] = list(Path("runs/eval/pope").rglob("results.json"))
    results = json.loads(results_file.read_text())
    pope = results["tasks"]["pope"]
    assert pope["benchmark"] == "pope" and pope["samples"] == 6 and pope["headline"] == "f1"
    rows = _rows(results_file.parent / "predictions/pope.jsonl")
    assert [r["id"] for r in rows] == [str(r["question_id"]) for r in records]
    for row, rec in zip(rows, records, strict=True):
        assert set(row) >= {"id", "prompt", "output", "parsed", "correct"}
        assert rec["text"] in row["prompt"] and row["prompt"].count("<image>") == 1
        assert row["answer"] == rec["label"] and row["parsed"] in ("yes", "no")
        assert row["correct"] == (row["parsed"] == rec["label"])
    # The results agree with the rows: per split accuracy, then their mean.
    splits = {}
    for row, rec in zip(rows, records, strict=True):
        splits.setdefault(rec["category"], []).append(row["correct"])
    for split, flags in splits.items():
        assert pope["metrics"][f"{split}/accuracy"] == pytest.approx(100 * sum(flags) / len(flags))
    mean = sum(100 * sum(f) / len(f) for f in splits.values()) / 3
    assert pope["metrics"]["accuracy"] == pytest.approx(mean)
    logged = (results_file.parent / "metrics.csv").read_text()
    assert "test/pope/f1" in logged and "test/pope/random/yes_ratio" in logged


def test_suite_recipe_runs_several_benchmarks(tiny_assets, synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_llava_suite(Path("data/eval"), synthetic_data)
    recipe = REPO / "recipes/eval/suite_llava.yaml"
    main(["test", f"--config={TINY}", f"--config={recipe}", *_model_args(tiny_assets)])
    [results_file] = list(Path("runs/eval/suite_llava").rglob("results.json"))
    tasks = json.loads(results_file.read_text())["tasks"]
    expected = {"vqav2", "gqa", "scienceqa", "textvqa", "pope", "mme", "mmbench", "mmmu"}
    assert set(tasks) == expected
    counts = {name: t["samples"] for name, t in tasks.items()}
    # MMBench: 3 circular copies of its one question; ScienceQA: the IMG subset only.
    assert counts == {
        "vqav2": 2, "gqa": 2, "scienceqa": 2, "textvqa": 2, "pope": 6, "mme": 3, "mmbench": 3,
        "mmmu": 2,
    }  # fmt: skip
    assert 0 <= tasks["mme"]["score"] <= 2000 and tasks["mme"]["scale"] == 2000
    for name in expected:
        rows = _rows(results_file.parent / f"predictions/{name}.jsonl")
        assert len(rows) == counts[name] and all(r["task"] == name for r in rows)


def test_tasks_are_validation_dataloaders_during_fit(
    tiny_assets, synthetic_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_pope(Path("data/eval"), synthetic_data)
    task = Task("pope", "data/eval/pope/llava_pope_test.jsonl", root="data/eval/coco/val2014")
    module = tiny_llava(tiny_assets, max_new_tokens=4)
    data = tiny_data(synthetic_data, val_tasks=[task], batch_size=4, eval_batch_size=4)
    trainer = L.Trainer(
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="fit"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    with next(Path(tmp_path / "fit").rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"val/loss", "val/pope/f1", "val/pope/accuracy", "val/pope/random/yes_ratio"} <= logged
    f1 = [float(r["val/pope/f1"]) for r in rows if r.get("val/pope/f1")]
    assert len(f1) == 1 and 0.0 <= f1[0] <= 100.0
    assert task.seen == 0  # reset after logging, ready for the next validation


def _fake_batch(samples: list[Sample]) -> Batch:
    n = len(samples)
    ids = torch.zeros(n, 1, dtype=torch.long)
    return Batch(
        ids,
        torch.ones_like(ids),
        ids,
        None,
        None,
        [0] * n,
        [s.id for s in samples],
        meta=[s.meta for s in samples],
    )


def test_task_rows_follow_the_official_rules(tmp_path):
    (tmp_path / "img.png").touch()
    problems = {
        str(pid): {
            "question": "Which?",
            "choices": ["cat", "dog", "cow"],
            "answer": 1,
            "image": "img.png",
            "split": "test",
        }
        for pid in range(5)
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    task = Task("scienceqa", str(tmp_path / "problems.json"), name="sqa")
    samples = task.samples()
    assert [s.id for s in samples] == ["0", "1", "2", "3", "4"]
    # LLaVA's rule: "B", "B. dog" and "The answer is B." count; "(B)" and "b" do not.
    answers = ["B", "B. dog", "The answer is B.", "(B)", "b"]
    rows = task.update(answers, _fake_batch(samples))
    assert [r["parsed"] for r in rows] == ["B", "B", "B", "", ""]
    assert [r["correct"] for r in rows] == [True, True, True, False, False]
    assert rows[0]["prompt"].startswith("<image>\nContext: N/A\nWhich?\nA. cat\nB. dog\nC. cow")
    assert task.compute() == {"accuracy": pytest.approx(60.0)}
    task.reset()
    assert task.seen == 0
    # VQA: the soft score of each row; correct means full credit.
    _jsonl(
        tmp_path / "vqa.jsonl",
        [
            {
                "question_id": 1,
                "question": "Colour?",
                "image": "img.png",
                "answers": ["red"] * 2 + ["blue"] * 8,
            }
        ],
    )
    vqa = Task("vqav2", str(tmp_path / "vqa.jsonl"))
    [red] = vqa.update(["Red"], _fake_batch(vqa.samples()))
    assert red["parsed"] == "red" and red["score"] == pytest.approx(0.6) and red["correct"] is False


def test_chat_benchmark_scores_a_chat_file_per_task(tmp_path):
    """`benchmark: chat` (recipes/eval/synthetic.yaml): a chat file's last assistant turn is the
    answer, out of the prompt; exact match after normalisation, overall and per record task."""
    (tmp_path / "a.png").touch()
    records = [
        {"id": f"r{i}", "task": task, "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer},
        ]}
        for i, (task, answer) in enumerate(
            [("colour", "red"), ("colour", "blue"), ("shape", "circle"), ("shape", "star")]
        )
    ]  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps(records))
    task = Task("chat", str(tmp_path / "test.json"), name="synthetic")
    samples = task.samples()
    assert [s.meta["answer"] for s in samples] == ["red", "blue", "circle", "star"]
    assert all(s.turns[-1].role == "user" for s in samples)  # the answer is not in the prompt
    rows = task.update(["Red.", "green", " circle", "square"], _fake_batch(samples))
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert "What is it?" in rows[0]["prompt"] and "red" not in rows[0]["prompt"]
    assert task.compute() == {
        "accuracy": pytest.approx(50.0),
        "colour": pytest.approx(50.0),
        "shape": pytest.approx(50.0),
    }
    records[0]["conversations"].pop()
    (tmp_path / "test.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="'r0'.*not an assistant answer"):
        Task("chat", str(tmp_path / "test.json")).samples()


def test_task_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'popee'"):
        Task("popee", "x.jsonl")
    with pytest.raises(FileNotFoundError, match="benchmark file .*missing.jsonl does not exist"):
        Task("pope", str(tmp_path / "missing.jsonl")).samples()
    with pytest.raises(FileNotFoundError, match="no file matches"):
        Task("mvbench", str(tmp_path / "json/*.json")).samples()
    with pytest.raises(ValueError, match=r"task names \['pope'\] appear more than once"):
        from lmm.data.datamodule import ChatDataModule
        from lmm.data.templates import Llama3

        ChatDataModule(Llama3(), test_tasks=[Task("pope", "a"), Task("pope", "b")])


def test_assistant_prefix_ends_the_prompt(tiny_assets, synthetic_data):
    module = tiny_llava(tiny_assets)
    data = tiny_data(synthetic_data, module)
    image = sorted((synthetic_data / "images").glob("*.png"))[0]
    turns = [Turn("user", [Media(0), "\nWhich option?"])]
    plain = Sample("v1", turns, [image])
    prefixed = Sample("v1", turns, [image], meta={"assistant_prefix": "Best option:("})
    base, extended = data.task_prompt(plain), data.task_prompt(prefixed)
    n = len(base.input_ids)
    assert torch.equal(extended.input_ids[:n], base.input_ids)
    assert module.tokenizer.decode(extended.input_ids[n:]) == "Best option:("
    assert (extended.labels[n:] == -100).all()


@pytest.mark.parametrize("recipe", EVAL_RECIPES, ids=lambda p: p.stem)
def test_eval_recipe_builds_its_tasks(recipe):
    import yaml

    config = yaml.safe_load(recipe.read_text())
    assert "template" not in config["data"]["init_args"]  # the model's recipe gives it
    config["data"]["init_args"]["template"] = "lmm.data.templates.Llama3"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    data = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    tasks = data.tasks["test"]
    assert tasks and all(isinstance(t, Task) for t in tasks)
    assert all(t.benchmark in BENCHMARKS for t in tasks)
    assert data.files["test"] is None
    if recipe.stem.startswith("suite_"):
        assert len(tasks) >= 5
    else:
        assert [t.name for t in tasks] == [recipe.stem]
