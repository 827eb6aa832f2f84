"""Tests of the synthetic VQA dataset: layout, determinism, vocabulary, balance and pixels."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmm.data import synthetic
from lmm.data.synthetic import COLOURS, NUMBERS, SHAPES, TASKS, corpus, generate, vocabulary

TOLERANCE = 40  # max per-channel distance from a palette colour (noise is ±8)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, train=150, val=20, test=30, image_size=32, seed=3)
    return out


def _records(out: Path, split: str = "train") -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def _answer(record: dict) -> str:
    return record["conversation"][1]["content"]


def _pixels(out: Path, path: str) -> np.ndarray:
    return np.asarray(Image.open(out / path), dtype=np.int16)


def _mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within TOLERANCE of palette `colour` on every channel."""
    return (np.abs(pixels - np.array(COLOURS[colour])) <= TOLERANCE).all(axis=-1)


def _components(mask: np.ndarray, min_size: int = 4) -> list[list[tuple[int, int]]]:
    """8-connected components of `mask` with at least `min_size` pixels (flood fill)."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        if len(pixels) >= min_size:
            found.append(pixels)
    return found


def _colours_present(pixels: np.ndarray) -> dict[str, int]:
    """Palette colours covering at least 6 pixels, with their pixel counts."""
    counts = {c: int(_mask(pixels, c).sum()) for c in COLOURS}
    return {c: n for c, n in counts.items() if n >= 6}


def _dominant(pixels: np.ndarray) -> str:
    present = _colours_present(pixels)
    return max(present, key=present.__getitem__)


def test_counts_per_split_and_task(data: Path) -> None:
    meta = json.loads((data / "meta.json").read_text())
    expected = {"train": 150, "val": 20, "test": 30}
    for split, n in expected.items():
        records = _records(data, split)
        assert len(records) == n
        counts = Counter(r["task"] for r in records)
        assert counts == {t: n // len(TASKS) for t in TASKS}
        assert meta["counts"][split] == dict(counts)
    assert meta["args"]["seed"] == 3 and meta["args"]["tasks"] == list(TASKS)
    assert meta["vocabulary"] == vocabulary()


def test_markers_match_images_and_files_exist(data: Path) -> None:
    ids = []
    for split in synthetic.SPLITS:
        for record in _records(data, split):
            ids.append(record["id"])
            content = record["conversation"][0]["content"]
            assert content.count("<image>") == len(record["images"]), record["id"]
            expected = 2 if record["task"] == "same_colour" else 1
            if record["task"] == "which_image":
                assert len(record["images"]) in (2, 3)
            else:
                assert len(record["images"]) == expected
            for path in record["images"]:
                image = Image.open(data / path)
                assert (image.size, image.mode) == ((32, 32), "RGB")
    assert len(set(ids)) == len(ids) == 200  # unique across splits, so images never collide


def test_image_size_is_honoured(tmp_path: Path) -> None:
    generate(tmp_path, train=5, val=0, test=0, image_size=48, tasks=("count",))
    record = _records(tmp_path)[0]
    assert Image.open(tmp_path / record["images"][0]).size == (48, 48)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.*"))}


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    kwargs = {"train": 10, "val": 5, "test": 5}
    a, b, c = (generate(tmp_path / n, seed=s, **kwargs) for n, s in (("a", 7), ("b", 7), ("c", 8)))
    assert a == b
    snap_a, snap_b, snap_c = (_snapshot(tmp_path / n) for n in "abc")
    assert snap_a == snap_b
    assert snap_a["train.json"] != snap_c["train.json"]
    shared = [k for k in snap_a.keys() & snap_c.keys() if k.endswith(".png")]
    assert len(shared) >= 20 and all(snap_a[k] != snap_c[k] for k in shared)


def test_splits_use_different_draws(data: Path) -> None:
    train, test = _records(data, "train"), _records(data, "test")
    # The first sample of each split has the same task and index: its image must still differ.
    assert train[0]["task"] == test[0]["task"]
    assert (
        _pixels(data, train[0]["images"][0]).tolist()
        != _pixels(data, test[0]["images"][0]).tolist()
    )


def test_answers_and_questions_use_the_vocabulary(data: Path) -> None:
    allowed = {
        "colour": set(COLOURS),
        "shape": set(SHAPES),
        "count": set(NUMBERS),
        "which_image": set(NUMBERS),
        "same_colour": {"yes", "no"},
    }
    words, prompts = set(vocabulary()), set(corpus())
    seen: dict[str, set[str]] = {t: set() for t in TASKS}
    for record in _records(data):
        question, answer = (turn["content"] for turn in record["conversation"])
        assert answer in allowed[record["task"]], record["id"]
        assert question in prompts and answer in prompts
        assert set(re.findall(r"\w+|[^\w\s]", question.replace("<image>", " "))) <= words
        seen[record["task"]].add(answer)
    assert seen["count"] == set(NUMBERS) and seen["shape"] == set(SHAPES)
    assert len(seen["colour"]) >= 4


def test_same_colour_balanced_and_which_image_spread(tmp_path: Path) -> None:
    generate(tmp_path, train=400, val=0, test=0, tasks=("which_image", "same_colour"), seed=1)
    records = _records(tmp_path)
    same = Counter(_answer(r) for r in records if r["task"] == "same_colour")
    assert same["yes"] == same["no"] == 100
    which = Counter(_answer(r) for r in records if r["task"] == "which_image")
    assert which["one"] >= 50 and which["two"] >= 50 and which["three"] >= 15
    for record in records:
        colours = [_dominant(_pixels(tmp_path, p)) for p in record["images"]]
        if record["task"] == "same_colour":
            assert (colours[0] == colours[1]) == (_answer(record) == "yes"), record["id"]
        else:
            asked = re.search(r"shows a (\w+) shape", record["conversation"][0]["content"])[1]
            assert NUMBERS.index(_answer(record)) < len(record["images"])
            assert [c == asked for c in colours].count(True) == 1, record["id"]
            assert colours[NUMBERS.index(_answer(record))] == asked, record["id"]


def test_count_images_hold_the_stated_number_of_shapes(tmp_path: Path) -> None:
    generate(tmp_path, train=60, val=0, test=0, tasks=("count",), seed=2)
    for record in _records(tmp_path):
        pixels = _pixels(tmp_path, record["images"][0])
        present = _colours_present(pixels)
        assert len(present) == 1, (record["id"], present)  # all shapes share one colour
        (colour,) = present
        found = len(_components(_mask(pixels, colour)))
        assert NUMBERS[found - 1] == _answer(record), record["id"]


def test_colour_and_shape_images_match_their_answers(data: Path) -> None:
    for record in _records(data):
        pixels = _pixels(data, record["images"][0])
        if record["task"] == "colour":
            assert _dominant(pixels) == _answer(record), record["id"]
        elif record["task"] == "shape":
            (component,) = _components(_mask(pixels, _dominant(pixels)))
            ys, xs = zip(*component, strict=True)
            fill = len(component) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
            # A square fills its box, a circle ~pi/4 of it, a triangle ~half of it.
            kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            assert kind == _answer(record), (record["id"], fill)


def test_background_is_grey(data: Path) -> None:
    pixels = _pixels(data, _records(data)[0]["images"][0])
    corner = pixels[0, 0]
    assert np.ptp(corner) <= 2 * synthetic.NOISE and corner.min() >= 200 - synthetic.NOISE


def test_main_parses_arguments(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--train", "4", "--val", "2", "--test", "2"]
    meta = synthetic.main([*argv, "--image-size", "24", "--tasks", "colour,count", "--seed", "5"])
    assert meta["counts"] == {
        "train": {"colour": 2, "count": 2},
        "val": {"colour": 1, "count": 1},
        "test": {"colour": 1, "count": 1},
    }
    assert meta["args"]["image_size"] == 24 and meta["args"]["seed"] == 5
    assert json.loads((tmp_path / "meta.json").read_text()) == meta


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("colour", "texture")}, "unknown task"),
        ({"tasks": ()}, "unknown task"),
        ({"image_size": 8}, "too small"),
        ({"seed": -1}, "negative"),
    ],
)
def test_bad_arguments_are_explained(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, train=1, val=0, test=0, **kwargs)
