"""Benchmarks from the hub (`path: hf:...`): a tiny dataset in the lmms-eval hub schema, written
here as the hub holds it (Parquet shards with embedded PNGs and a README naming subsets and
splits, or a `save_to_disk` folder), against the same questions in the published local files.
Both must give equal samples (ids, prompts, pixels, gold) and, for one fixed answer list, equal
rows and scores."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.data.batch import Batch
from lmm.data.media import load_image
from lmm.data.sample import Sample, VideoRef
from lmm.evaluation import hub
from lmm.evaluation.runner import BENCHMARKS, Task

datasets = pytest.importorskip("datasets")
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ helpers


def png(i: int, size: int = 16) -> bytes:
    """A distinct small PNG per `i` (odd ones palette-mode, so the RGB conversion runs too)."""
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if i % 2:
        img = img.convert("P")
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def cell(data: bytes | None) -> dict | None:
    return None if data is None else {"bytes": data, "path": None}


def table(columns: dict, media: tuple[str, ...] = ("image",)):
    """A `datasets.Dataset` whose `media` columns are `Image` features, as the hub's."""
    data = datasets.Dataset.from_dict(columns)
    for name in media:
        data = data.cast_column(name, datasets.Image())
    return data


def write_hub(folder: Path, subsets: dict[str | None, dict[str, object]]) -> Path:
    """A dataset folder in the hub layout: `<subset>/<split>-00000-of-00001.parquet` per split
    and a README whose `configs` name them (`None`: the default subset)."""
    lines = ["---", "configs:"]
    for subset, splits in subsets.items():
        name = subset or "default"
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, data in splits.items():
            shard = folder / name / f"{split}-00000-of-00001.parquet"
            shard.parent.mkdir(parents=True, exist_ok=True)
            data.to_parquet(str(shard))
            lines += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    (folder / "README.md").write_text("\n".join([*lines, "---", ""]))
    return folder


def write_image(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.name


def batch_of(samples: list[Sample]) -> Batch:
    n = len(samples)
    ids = torch.zeros(n, 1, dtype=torch.long)
    return Batch(
        ids, torch.ones_like(ids), ids, None, None, [0] * n, [s.id for s in samples],
        meta=[s.meta for s in samples],
    )  # fmt: skip


def pixels(item) -> np.ndarray | Path:
    if isinstance(item, VideoRef):
        return item.path
    return np.asarray(load_image(item))


def same_benchmark(local: Task, remote: Task, answers: list[str], ids=None) -> dict[str, float]:
    """Both tasks read equal samples (ids, or `ids` for the hub side; turns; gold; pixels) and
    score `answers` alike, row by row and in total; returns the scores."""
    a, b = local.samples(), remote.samples()
    assert len(a) == len(b) == len(answers)
    assert [s.id for s in b] == (ids or [s.id for s in a])
    cache = hub.cache_dir()
    for x, y in zip(a, b, strict=True):
        assert x.turns == y.turns
        assert x.meta == y.meta
        assert len(x.images) == len(y.images)
        for p, q in zip(x.images, y.images, strict=True):
            if isinstance(q, Path):  # embedded: a file in the media cache, read as a local file
                assert cache in q.parents
                assert np.array_equal(pixels(p), pixels(q))
            else:
                assert p == q
    rows_a = local.update(answers, batch_of(a))
    rows_b = remote.update(answers, batch_of(b))
    keys = ("prompt", "output", "parsed", "answer", "correct", "score")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    scores = local.compute()
    assert scores == remote.compute()
    return scores


# ------------------------------------------------------------------------------ benchmarks


def test_hub_dataset_pope(tmp_path):
    # POPE's published per-split files (AoiDragon/POPE, question ids restart in each split)
    # against lmms-lab/POPE (split test), here a `save_to_disk` copy.
    questions = [("adversarial", 1, "dog", "yes"), ("adversarial", 2, "cat", "no"),
                 ("random", 1, "car", "yes"), ("random", 2, "cow", "no")]  # fmt: skip
    local = tmp_path / "pope"
    for split in ("adversarial", "random"):
        lines = []
        for k, (s, qid, obj, label) in enumerate(questions):
            if s == split:
                name = write_image(local / "val2014" / f"COCO_val2014_{k:012d}.jpg", png(k))
                text = f"Is there a {obj} in the image?"
                lines.append(json.dumps({"question_id": qid, "image": name, "text": text,
                                         "label": label}))  # fmt: skip
        (local / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    rows = table(
        {
            "id": [str(k) for k in range(4)],
            "question_id": [str(q[1]) for q in questions],
            "question": [f"Is there a {q[2]} in the image?" for q in questions],
            "answer": [q[3] for q in questions],
            "image_source": [f"COCO_val2014_{k:012d}" for k in range(4)],
            "image": [cell(png(k)) for k in range(4)],
            "category": [q[0] for q in questions],
        }
    )
    datasets.DatasetDict({"test": rows}).save_to_disk(str(tmp_path / "POPE"))
    files = Task("pope", str(local / "coco_pope_*.json"), root=str(local / "val2014"))
    scores = same_benchmark(
        files, Task("pope", f"hf:{tmp_path / 'POPE'}"), ["Yes", "No, there is not.", "no", "yes"]
    )  # adversarial: TP, TN; random: FN, FP
    ids = ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert [s.id for s in files.samples()] == ids
    assert scores["adversarial/f1"] == 100.0 and scores["random/f1"] == 0.0
    assert scores["f1"] == pytest.approx(50.0)


def test_hub_dataset_mme(tmp_path):
    # LLaVA's llava_mme.jsonl layout against lmms-lab/MME (split test). count/2.jpg and
    # count/3.jpg are distinct pictures with the same bytes: still two pairs for acc+.
    images = {"artwork/1.jpg": png(1), "count/2.jpg": png(2), "count/3.jpg": png(2)}
    rows = [
        (qid, q, a) for qid in images for q, a in (("Is it red?", "Yes"), ("Is it blue?", "No"))
    ]
    local = tmp_path / "mme"
    for rel, data in images.items():
        write_image(local / "MME_Benchmark_release_version" / rel, data)
    (local / "mme.jsonl").write_text("".join(
        json.dumps({"question_id": qid, "image": qid, "text": f"{q} Please answer yes or no.",
                    "answer": a, "category": qid.split("/")[0]}) + "\n"
        for qid, q, a in rows
    ))  # fmt: skip
    remote = write_hub(tmp_path / "MME", {None: {"test": table({
        "question_id": [r[0] for r in rows],
        "image": [cell(images[r[0]]) for r in rows],
        "question": [f"{r[1]} Please answer yes or no." for r in rows],
        "answer": [r[2] for r in rows],
        "category": [r[0].split("/")[0] for r in rows],
    })}})  # fmt: skip
    answers = ["Yes", "No", "Yes", "Yes", "yes", "no"]  # count/2.jpg: one wrong
    root = str(local / "MME_Benchmark_release_version")
    scores = same_benchmark(
        Task("mme", str(local / "mme.jsonl"), root=root), Task("mme", f"hf:{remote}"), answers
    )
    assert scores["artwork/score"] == pytest.approx(200.0)
    assert scores["count/acc"] == pytest.approx(75.0)
    assert scores["count/acc_plus"] == pytest.approx(50.0)  # one pair of two, not 0 of 1
    assert scores["perception"] == pytest.approx(325.0)


def mmbench_rows() -> list[dict]:
    """Two MMBench questions with their circular copies (index g + k·1e6, options rotated)."""
    questions = [
        (0, "What colour?", ["red", "green", "blue"], "B", "Hint: a leaf.", "coarse_perception"),
        (1, "How many?", ["one", "two"], "A", None, "fine-grained_perception (instance-level)"),
    ]
    rows = []
    for g, question, options, answer, hint, l2 in questions:
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            letter = "ABCD"[("ABCD".index(answer) - k) % len(options)]
            row = {"index": g + k * 1_000_000, "question": question, "hint": hint,
                   "answer": letter, "category": "image_style", "l2": l2, "group": g}  # fmt: skip
            row.update(
                {c: (rotated[i] if i < len(rotated) else None) for i, c in enumerate("ABCD")}
            )
            rows.append(row)
    return rows


def test_hub_dataset_mmbench(tmp_path):
    # VLMEvalKit's MMBench_DEV_EN.tsv (base64 images; copies name their original's row) against
    # lmms-lab/MMBench (subset en, split dev; copies shipped, missing cells "nan", L2-category).
    rows = mmbench_rows()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
              "l2-category", "image"]  # fmt: skip
    lines = ["\t".join(header)]
    for r in rows:
        image = base64.b64encode(png(r["group"])).decode() if r["index"] < 1e6 else str(r["group"])
        cells = [str(r["index"]), r["question"], r["hint"] or "", *(r[c] or "" for c in "ABCD"),
                 r["answer"], r["category"], r["l2"], image]  # fmt: skip
        lines.append("\t".join(cells))
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("\n".join(lines) + "\n")
    remote = write_hub(tmp_path / "MMBench", {"en": {"dev": table({
        "index": [r["index"] for r in rows],
        "question": [r["question"] for r in rows],
        "hint": [r["hint"] or "nan" for r in rows],
        **{c: [r[c] or "nan" for r in rows] for c in "ABCD"},
        "answer": [r["answer"] for r in rows],
        "category": [r["category"] for r in rows],
        "image": [cell(png(r["group"])) for r in rows],
        "source": ["MMBench"] * len(rows),
        "L2-category": [r["l2"] for r in rows],
        "comment": ["nan"] * len(rows),
        "split": ["dev"] * len(rows),
    })}})  # fmt: skip
    answers = ["B", "A", "C", "A", "A"]  # group 0: every copy right; group 1: the copy wrong
    scores = same_benchmark(
        Task("mmbench", str(tmp_path / "MMBench_DEV_EN.tsv"), root=str(tmp_path / "tsv_images")),
        Task("mmbench", f"hf:{remote}"),
        answers,
    )
    assert [r["answer"] for r in rows] == ["B", "A", "C", "A", "B"]
    assert scores["circular"] == pytest.approx(50.0)
    assert scores["vanilla"] == pytest.approx(100.0)


def test_hub_dataset_scienceqa(tmp_path):
    # ScienceQA's problems.json + images/test/<pid>/image.png against lmms-lab/ScienceQA
    # (subset ScienceQA-IMG, split test: image questions only, no problem id).
    problems = {
        "5": ("Which is a mammal?", ["cat", "trout"], 0, "Look at the picture.", True, "test"),
        "7": ("Which word is a noun?", ["run", "tree"], 1, "", False, "test"),  # no image
        "9": ("Which is hotter?", ["ice", "tea", "snow"], 1, "", True, "test"),
        "11": ("Which is bigger?", ["ant", "whale"], 1, "", True, "train"),
        "12": ("Which is a planet?", ["Mars", "Moon", "Sun", "Vega"], 0, "Space.", True, "test"),
    }
    local = tmp_path / "scienceqa"
    records = {}
    for pid, (question, choices, answer, hint, has_image, split) in problems.items():
        if has_image:
            write_image(local / "images" / split / pid / "image.png", png(int(pid)))
        records[pid] = {"question": question, "choices": choices, "answer": answer,
                        "hint": hint, "image": "image.png" if has_image else None,
                        "split": split, "subject": "natural science"}  # fmt: skip
    (local / "problems.json").write_text(json.dumps(records))
    img_test = [p for p, v in problems.items() if v[4] and v[5] == "test"]
    columns = ("question", "choices", "answer", "hint")
    remote = write_hub(tmp_path / "ScienceQA", {"ScienceQA-IMG": {"test": table({
        "image": [cell(png(int(p))) for p in img_test],
        **{c: [problems[p][i] for p in img_test] for i, c in enumerate(columns)},
        "task": ["closed choice"] * 3, "grade": ["grade2"] * 3,
        "subject": ["natural science"] * 3, "topic": ["biology"] * 3, "category": ["x"] * 3,
        "skill": ["y"] * 3, "lecture": [""] * 3, "solution": [""] * 3,
    })}})  # fmt: skip
    scores = same_benchmark(
        Task("scienceqa", str(local / "problems.json"), root=str(local / "images" / "test"),
             read_args={"split": "test"}),
        Task("scienceqa", f"hf:{remote}"),
        ["A", "B.", "The answer is C."],  # right; LLaVA rejects "B."; C is wrong
        ids=["#0", "#1", "#2"],
    )  # fmt: skip
    assert scores["accuracy"] == pytest.approx(100 / 3)


def test_hub_dataset_textvqa(tmp_path):
    # The official TextVQA_0.5.1_val.json + train_images against lmms-lab/textvqa (validation).
    questions = [
        (34602, "what brand is this?", "aa11", ["nokia"] * 7 + ["nokia phone"] * 3, ["NOKIA"]),
        (34603, "what is the number?", "bb22", ["12"] * 2 + ["twelve"] * 8, ["12", "FOR"]),
        (34604, "who wrote it?", "aa11", ["jane doe"] * 10, []),
    ]
    local = tmp_path / "textvqa"
    for k, image_id in enumerate(["aa11", "bb22"]):
        write_image(local / "train_images" / f"{image_id}.jpg", png(10 + k))
    (local / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": q, "question": text, "image_id": image, "answers": answers,
         "ocr_tokens": ocr, "set_name": "val"}
        for q, text, image, answers, ocr in questions
    ]}))  # fmt: skip
    n = len(questions)
    remote = write_hub(tmp_path / "textvqa", {None: {"validation": table({
        "image_id": [q[2] for q in questions],
        "question_id": [q[0] for q in questions],
        "question": [q[1] for q in questions],
        "question_tokens": [q[1].split() for q in questions],
        "image": [cell(png(10 + ["aa11", "bb22"].index(q[2]))) for q in questions],
        "image_width": [16] * n, "image_height": [16] * n,
        "flickr_original_url": [""] * n, "flickr_300k_url": [""] * n,
        "answers": [q[3] for q in questions],
        "image_classes": [["Poster"]] * n, "set_name": ["val"] * n,
        "ocr_tokens": [q[4] for q in questions],
    })}})  # fmt: skip
    read_args = {"with_ocr": True}
    scores = same_benchmark(
        Task("textvqa", str(local / "TextVQA_0.5.1_val.json"), root=str(local / "train_images"),
             read_args=read_args),
        Task("textvqa", f"hf:{remote}", read_args=read_args),
        ["Nokia", "12", "john"],  # 1.0, 0.6, 0.0
    )  # fmt: skip
    assert scores["accuracy"] == pytest.approx(100 * (1.0 + 0.6) / 3)


def test_hub_dataset_gqa(tmp_path):
    # GQA's testdev_balanced_questions.json + images against lmms-lab/GQA: the questions subset
    # testdev_balanced_instructions joined by imageId with testdev_balanced_images.
    questions = {
        "201307251": ("n161313", "Is it overcast?", "no", "verify", "global"),
        "201640614": ("n161313", "Who is wearing the dress?", "woman", "query", "rel"),
        "202225914": ("n235859", "Which color is the car?", "red", "query", "attr"),
        "20968379": ("n235859", "Are there both cars and trucks?", "yes", "logical", "obj"),
    }
    records = {
        qid: {"imageId": image, "question": question, "answer": answer,
              "fullAnswer": f"The answer is {answer}.", "isBalanced": True,
              "groups": {"global": None, "local": "10c-sky"},
              "entailed": [], "equivalent": [qid],
              "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}
        for qid, (image, question, answer, structural, semantic) in questions.items()
    }  # fmt: skip
    local = tmp_path / "gqa"
    for k, image in enumerate(["n161313", "n235859"]):
        write_image(local / "images" / f"{image}.jpg", png(20 + k))
    (local / "testdev_balanced_questions.json").write_text(json.dumps(records))
    remote = write_hub(tmp_path / "GQA", {
        "testdev_balanced_instructions": {"testdev": datasets.Dataset.from_list(
            [{"id": qid, **rec, "semanticStr": "select: sky"} for qid, rec in records.items()]
        )},
        "testdev_balanced_images": {"testdev": table({
            "id": ["n235859", "n161313"], "image": [cell(png(21)), cell(png(20))],
        })},
    })  # fmt: skip
    scores = same_benchmark(
        Task("gqa", str(local / "testdev_balanced_questions.json"), root=str(local / "images")),
        Task("gqa", f"hf:{remote}"),
        ["No.", "man", "Red", "yes"],  # LLaVA's rstrip('.').lower(): right, wrong, right, right
    )
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["open"] == pytest.approx(50.0)
    assert scores["binary"] == pytest.approx(100.0)


def test_hub_dataset_mvbench(tmp_path):
    # OpenGVLab/MVBench's json/<task>.json with bare video names, the videos in each task's
    # folder of the published layout, against the hub dataset: one subset per task, split
    # train, the same JSON files (the videos are not in the rows: `root` is their folder).
    mp4 = b"\x00\x00\x00\x18ftypmp42" + bytes(16)  # a video by content (never decoded here)
    videos = tmp_path / "video"
    for folder, name in (("star/Charades_v1_480", "A1B2C.mp4"),
                         ("Moments_in_Time_Raw/videos", "jumping/x.mp4")):  # fmt: skip
        write_image(videos / folder / name, mp4)
    tasks = {
        "action_sequence": [
            {"video": "A1B2C.mp4", "question": "What did the person do first?",
             "candidates": ["Sat down.", "Took the cup."], "answer": "Took the cup.",
             "start": 1.5, "end": 9.0},
            {"video": "A1B2C.mp4", "question": "What happened last?",
             "candidates": ["Opened the door.", "Ate.", "Slept."], "answer": "Ate.",
             "start": 0.0, "end": 4.0},
        ],
        "fine_grained_action": [
            {"video": "jumping/x.mp4", "question": "What is the action?",
             "candidates": ["jumping", "running"], "answer": "jumping"},
        ],
    }  # fmt: skip
    local = tmp_path / "mvbench"
    remote = tmp_path / "MVBench"
    readme = ["---", "configs:"]
    for task, recs in tasks.items():
        for folder in (local, remote):
            (folder / "json").mkdir(parents=True, exist_ok=True)
            (folder / "json" / f"{task}.json").write_text(json.dumps(recs))
        readme += [f"- config_name: {task}", "  data_files:", "  - split: train",
                   f"    path: json/{task}.json"]  # fmt: skip
    (remote / "README.md").write_text("\n".join([*readme, "---", ""]))
    scores = same_benchmark(
        Task("mvbench", str(local / "json" / "*.json"), root=str(videos), max_frames=4),
        Task("mvbench", f"hf:{remote}", root=str(videos), max_frames=4,
             subset=["action_sequence", "fine_grained_action"]),
        ["B) Took the cup.", "C) Slept.", "A"],  # right, wrong, right
    )  # fmt: skip
    assert scores["accuracy"] == pytest.approx(200 / 3)
    assert scores["action_sequence"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="does not embed its media; give `root`"):
        Task("mvbench", f"hf:{remote}", subset="action_sequence").samples()


def _other_hub_rows(tmp_path: Path) -> dict[str, tuple[dict, dict]]:
    """One or two rows of each other benchmark's hub dataset, in its schema, and its task args."""
    img = cell(png(30))
    scores = "visual quality: 3\n temporal consistency: 2\n dynamic degree: 4\n " \
             "text-to-video alignment: 1\n factual consistency: 3"  # fmt: skip
    frames = tmp_path / "frames" / "v1"
    for name in ("f0.jpg", "f1.jpg"):
        write_image(frames / name, png(31))
    mantis = {"id": ["m1"], "question_type": ["multi-choice"], "question": ["Same? <image>"],
              "images": [[img]], "options": [["(A) yes", "(B) no"]], "answer": ["A"],
              "data_source": ["x"], "category": ["y"]}  # fmt: skip
    return {
        "vqav2": ({"question_id": [1, 2], "question": ["Colour?", "How many?"],
                   "question_type": ["what color", "how many"],
                   "multiple_choice_answer": ["red", "2"],
                   "answers": [[{"answer": "red", "answer_confidence": "yes", "answer_id": 1}]] * 2,
                   "image_id": [9, 9], "answer_type": ["other", "number"], "image": [img, img]},
                  {}),
        "mmmu": ({"id": ["validation_Art_1"], "question": ["<image 1> Which style?"],
                  "options": ["['Baroque', 'Cubism']"], "explanation": [""], "image_1": [img],
                  "image_2": [None], "img_type": ["['Paintings']"], "answer": ["B"],
                  "topic_difficulty": ["Easy"], "question_type": ["multiple-choice"],
                  "subfield": ["Art"]}, {}),
        "blink": ({"idx": ["val_Art_Style_1"], "question": ["Which matches?"],
                   "sub_task": ["Art_Style"], "image_1": [img], "image_2": [img],
                   "image_3": [None], "image_4": [None], "choices": [["(A)", "(B)"]],
                   "answer": ["(A)"], "prompt": ["Which image matches? (A) or (B)"],
                   "explanation": [""]}, {"subset": ["Art_Style"]}),
        "qbench": ({"id": [0], "image": [img], "question": ["Is it blurry?"], "option0": ["Yes"],
                    "option1": ["No"], "option2": ["N/A"], "option3": ["N/A"],
                    "question_type": [0], "question_concern": [0], "correct_choice": ["B"]}, {}),
        "mantis_eval": (mantis, {}),
        "nlvr2": (mantis, {}),
        "videofeedback": ({"id": ["v1"], "images": [["f0.jpg", "f1.jpg"]],
                           "conversations": [[{"from": "human", "value": "<image><image> Rate."},
                                              {"from": "gpt", "value": scores}]]},
                          {"root": str(tmp_path / "frames")}),
    }  # fmt: skip


@pytest.mark.parametrize(
    "benchmark", ["vqav2", "mmmu", "blink", "qbench", "mantis_eval", "nlvr2", "videofeedback"]
)
def test_hub_dataset_reads_in_the_other_benchmarks(benchmark, tmp_path):
    # Each other benchmark's hub schema (lmms-eval's, or Mantis's / VideoScore's for their
    # sets) becomes samples whose media are files, scored without error.
    columns, args = _other_hub_rows(tmp_path)[benchmark]
    source = BENCHMARKS[benchmark].hub
    media = [k for k, v in columns.items() if any(isinstance(x, dict) and "bytes" in x for x in v)]
    data = table(columns, media=tuple(media))
    if benchmark in ("mantis_eval", "nlvr2"):
        data = data.cast_column("images", datasets.List(datasets.Image()))
    subset = (args.get("subset") or [source.subset])[0]
    remote = write_hub(tmp_path / source.repo.split("/")[1], {subset: {source.split: data}})
    task = Task(benchmark, f"hf:{remote}", **args)
    samples = task.samples()
    assert len(samples) == len(next(iter(columns.values())))
    for sample in samples:
        assert sample.images and all(Path(p).is_file() for p in sample.images)
        assert all(np.asarray(load_image(p)).shape[-1] == 3 for p in sample.images)
    rows = task.update(["A"] * len(samples), batch_of(samples))
    assert len(rows) == len(samples) and task.compute()


# ------------------------------------------------------------------------------ the rest


def test_hub_errors_name_the_dataset(tmp_path):
    with pytest.raises(hub.HubDatasetError, match=r"(?s)hf:nobody/no-such-benchmark .*test.*Fix"):
        Task("pope", "hf:nobody/no-such-benchmark").samples()
    folder = write_hub(tmp_path / "POPE", {None: {"test": datasets.Dataset.from_dict({"x": [1]})}})
    with pytest.raises(hub.HubDatasetError, match="split validation"):
        Task("pope", f"hf:{folder}", split="validation").samples()
    with pytest.raises(hub.HubDatasetError, match="have no column 'category'.*Fix"):
        Task("pope", f"hf:{folder}").samples()  # not POPE's rows


def test_local_folders_do_not_share_a_cache(tmp_path):
    # `datasets` keys its cache of a folder by the folder's name and file patterns: two folders
    # named MME, or one rewritten, must still read their own rows.
    def mme(folder: Path, answer: str) -> Path:
        rows = {"question_id": ["count/1.jpg"], "image": [cell(png(1))],
                "question": ["Two dogs?"], "answer": [answer], "category": ["count"]}  # fmt: skip
        return write_hub(folder, {None: {"test": table(rows)}})

    first, second = mme(tmp_path / "a" / "MME", "Yes"), mme(tmp_path / "b" / "MME", "No")
    gold = [Task("mme", f"hf:{f}").samples()[0].meta["answer"] for f in (first, second)]
    assert gold == ["yes", "no"]
    mme(first, "No")  # rewritten in place
    assert Task("mme", f"hf:{first}").samples()[0].meta["answer"] == "no"


def test_lmm_tasks_lists_every_benchmark(capsys):
    from lmm.cli import main

    main(["tasks"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert set(lines) == set(BENCHMARKS) and len(BENCHMARKS) == 16  # 15 published, and chat
    assert "POPEMetrics (f1)" in lines["pope"] and "hf:lmms-lab/POPE (split test)" in lines["pope"]
    assert "hf:lmms-lab/GQA (subset testdev_balanced_instructions" in lines["gqa"]
    assert "local files only" in lines["demon"] and "local files only" in lines["chat"]
    # docs/evaluation.md says where each benchmark's data comes from, hub ids included
    docs = (REPO / "docs" / "evaluation.md").read_text()
    for name, spec in BENCHMARKS.items():
        if spec.hub is not None:
            assert f"`{spec.hub.repo}`" in docs, name


def test_lmm_test_scores_a_hub_dataset_as_its_local_files(
    tiny_assets, synthetic_data, tmp_path, monkeypatch
):
    # `lmm test` with the tiny model: POPE from its local files (the pope recipe) and the same
    # questions as an lmms-lab/POPE-schema dataset (an eval recipe with `path: hf:<folder>`)
    # give the same answers and scores, so the model saw the same pixels and prompts.
    import yaml

    from lmm.cli import main
    from tests.evaluation.test_runner import TINY, _model_args, _rows, write_pope

    monkeypatch.chdir(tmp_path)
    records = write_pope(Path("data/eval"), synthetic_data)
    images = Path("data/eval/coco/val2014")
    remote = write_hub(tmp_path / "POPE", {None: {"test": table({
        "id": [str(k) for k in range(len(records))],
        "question_id": [str(r["question_id"]) for r in records],
        "question": [r["text"] for r in records],
        "answer": [r["label"] for r in records],
        "image_source": [Path(r["image"]).stem for r in records],
        "image": [cell((images / r["image"]).read_bytes()) for r in records],
        "category": [r["category"] for r in records],
    })}})  # fmt: skip
    recipe = yaml.safe_load((REPO / "recipes/eval/pope.yaml").read_text())
    recipe["trainer"]["logger"]["init_args"]["name"] = "pope_hub"
    recipe["data"]["init_args"]["test_tasks"][0]["init_args"] = {
        "benchmark": "pope", "path": f"hf:{remote}", "split": "test", "max_new_tokens": 16,
    }  # fmt: skip
    Path("pope_hub.yaml").write_text(yaml.safe_dump(recipe))
    for config in (REPO / "recipes/eval/pope.yaml", Path("pope_hub.yaml")):
        main(["test", f"--config={TINY}", f"--config={config}", *_model_args(tiny_assets)])
    [local] = Path("runs/eval/pope").rglob("results.json")
    [remote_results] = Path("runs/eval/pope_hub").rglob("results.json")
    a, b = (json.loads(f.read_text())["tasks"]["pope"] for f in (local, remote_results))
    assert a["samples"] == b["samples"] == len(records)
    assert a["metrics"] == b["metrics"]
    rows_a = _rows(local.parent / "predictions/pope.jsonl")
    rows_b = _rows(remote_results.parent / "predictions/pope.jsonl")
    assert [r["id"] for r in rows_b] == [f"{r['category']}/{r['question_id']}" for r in records]
    keys = ("prompt", "output", "parsed", "answer", "correct")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    assert b["file"] == f"hf:{remote}"
