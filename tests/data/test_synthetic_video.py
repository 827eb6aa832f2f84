"""The synthetic `motion` (video) and `score` (classification) tasks: content, seeds, reading."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.data import synthetic
from lmm.data.collate import PadCollator
from lmm.data.formats import VideoOptions, load_samples
from lmm.data.media import ImageTransform
from lmm.data.processor import MediaSpec, Processor
from lmm.data.sample import VideoRef
from lmm.data.synthetic import DIRECTIONS, SCORE_GREY, SCORE_LABELS, TASKS, corpus, generate
from lmm.data.templates import Llama3
from lmm.data.tokenization import load_tokenizer
from lmm.data.video import VideoReader
from lmm.tiny import build_tokenizer
from tests.data.test_synthetic import _components, _mask, _snapshot
from tests.helpers import tiny_llava_args

FRAMES = 5


class _FourTokens(MediaSpec):
    """4 feature slots per image or video frame, 32 px views."""

    transform = ImageTransform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")

    def num_image_tokens(self, image_size):
        return 4


@pytest.fixture(scope="module")
def motion(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("motion")
    generate(out, train=24, val=8, test=8, tasks=["motion"], frames=FRAMES, seed=1)
    return out


@pytest.fixture(scope="module")
def score(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score")
    generate(out, train=40, val=8, test=8, tasks=["score"], seed=1)
    return out


def _records(out: Path, split: str = "train") -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def _centre(frame: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the pixels far from the frame's background colour."""
    background = np.median(frame.reshape(-1, 3), axis=0)
    ys, xs = np.nonzero(np.abs(frame.astype(int) - background).sum(axis=-1) > 60)
    return float(xs.mean()), float(ys.mean())


def test_motion_clips_move_the_way_the_answer_says(motion):
    reader = VideoReader()
    answers = Counter()
    for record in _records(motion):
        answer = record["conversation"][1]["content"]
        answers[answer] += 1
        info = reader.info(motion / record["video"])
        assert (info.num_frames, info.width, info.height) == (FRAMES, 32, 32)
        frames = reader.read(motion / record["video"], range(FRAMES))
        centres = np.array([_centre(f) for f in frames])  # [F, 2]
        dx, dy = DIRECTIONS[answer]
        moved = centres[-1] - centres[0]
        along, across = (moved[0], moved[1]) if dx else (moved[1], moved[0])
        assert along * (dx or dy) > 0.3 * 32, (record["id"], centres.tolist())
        assert abs(across) < 1.5, (record["id"], centres.tolist())
        steps = np.diff(centres, axis=0) @ np.array([dx, dy])
        assert (steps > 0).all(), (record["id"], steps)  # every frame moves on
    assert answers == dict.fromkeys(DIRECTIONS, 6)  # balanced: 24 clips, 4 directions


def test_motion_start_does_not_give_the_direction_away(tmp_path):
    """Where a clip starts overlaps between directions, so one frame is not enough."""
    generate(tmp_path, train=80, val=0, test=0, tasks=["motion"], seed=2)
    reader = VideoReader()
    starts: dict[str, list[tuple[float, float]]] = {d: [] for d in DIRECTIONS}
    for record in _records(tmp_path):
        first = reader.read(tmp_path / record["video"], [0])[0]
        starts[record["conversation"][1]["content"]].append(_centre(first))
    x_right = [x for x, _ in starts["right"]]
    x_up = [x for x, _ in starts["up"]]
    assert min(x_up) < max(x_right) and max(x_up) > min(x_right)  # vertical clips anywhere in x


def test_motion_records_load_and_process_as_videos(motion):
    samples = load_samples(motion / "val.json", video=VideoOptions(max_frames=8))
    assert len(samples) == 8
    sample = samples[0]
    [video] = sample.images
    assert isinstance(video, VideoRef) and video.path.suffix == ".mp4"
    assert sample.turns[0].text == "Which way does the shape move?\n<image>"
    assert sample.turns[1].text in DIRECTIONS and sample.meta["task"] == "motion"
    tokenizer = _tokenizer(motion)
    media = _FourTokens()
    processor = Processor(tokenizer, Llama3(), media, max_length=256)
    features = processor(sample)
    assert features.pixel_values.shape == (FRAMES, 3, 32, 32)
    assert features.media_modes == ["video"] and features.views_per_media == [FRAMES]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((features.input_ids == image_id).sum()) == 4 * FRAMES
    assert processor.length(sample) == len(features.input_ids)


def test_score_targets_are_read_from_the_image(score):
    records = _records(score)
    counts = Counter()
    for record in records:
        assert set(record) == {"id", "task", "images", "prompt", "labels"}
        labels = record["labels"]
        assert list(labels) == list(SCORE_LABELS)
        pixels = np.asarray(Image.open(score / record["images"][0]), dtype=np.int16)
        # brightness: the background grey, mapped linearly from SCORE_GREY to [1, 4]
        lo, hi = SCORE_GREY
        grey = np.median(pixels.reshape(-1, 3), axis=0).mean()
        assert abs(1 + 3 * (grey - lo) / (hi - lo) - labels["brightness"]) < 0.05, record["id"]
        assert 1.0 <= labels["brightness"] <= 4.0
        # count: one colour, that many separate shapes
        colours = [c for c in synthetic.COLOURS if _mask(pixels, c).sum() >= 6]
        assert len(colours) == 1, (record["id"], colours)
        assert len(_components(_mask(pixels, colours[0]))) == labels["count"], record["id"]
        counts[labels["count"]] += 1
    assert set(counts) == {1.0, 2.0, 3.0, 4.0}
    meta = json.loads((score / "meta.json").read_text())
    assert meta["labels"] == list(SCORE_LABELS)


def test_score_records_load_with_targets_and_collate(score):
    samples = load_samples(score / "train.json", labels=["count", "brightness"])
    records = _records(score)
    for sample, record in zip(samples, records, strict=True):
        assert sample.target == [record["labels"]["count"], record["labels"]["brightness"]]
        assert sample.meta["task"] == "score" and sample.turns[0].role == "user"
        assert sample.turns[0].text == synthetic.SCORE_PROMPT + "<image> "
    tokenizer = _tokenizer(score)
    media = _FourTokens()
    processor = Processor(tokenizer, Llama3(), media, max_length=256)
    batch = PadCollator(tokenizer.pad_token_id)([processor(s) for s in samples[:3]])
    expected = [[r["labels"]["count"], r["labels"]["brightness"]] for r in records[:3]]
    torch.testing.assert_close(batch.targets, torch.tensor(expected))
    assert (batch.labels == -100).all()  # a scored sample trains no token


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    kwargs = {"train": 6, "val": 2, "test": 2}
    for task in ("motion", "score"):
        a, b, c = (tmp_path / f"{task}_{n}" for n in "abc")
        generate(a, tasks=[task], seed=5, **kwargs)
        generate(b, tasks=[task], seed=5, **kwargs)
        generate(c, tasks=[task], seed=6, **kwargs)
        snap_a, snap_c = _snapshot(a), _snapshot(c)
        assert snap_a == _snapshot(b), task
        media = [k for k in snap_a if k.endswith((".mp4", ".png"))]
        assert len(media) == 10 and all(snap_a[k] != snap_c[k] for k in media), task


def test_motion_mixes_with_image_tasks_and_score_stands_alone(tmp_path):
    meta = generate(tmp_path / "mix", train=6, val=0, test=0, tasks=["colour", "motion"])
    assert meta["counts"]["train"] == {"colour": 3, "motion": 3}
    assert set(corpus(["colour", "motion"])) >= set(corpus()) | set(DIRECTIONS)
    with pytest.raises(ValueError, match="score.*own folder"):
        generate(tmp_path / "bad", train=2, val=0, test=0, tasks=["colour", "score"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        generate(tmp_path / "bad", train=2, val=0, test=0, tasks=["motion"], frames=1)


def test_default_corpus_is_unchanged_by_the_new_tasks():
    """The tokenizer of the image quickstart (built from `corpus()`) does not change."""
    assert corpus() == corpus(TASKS)
    assert not set(corpus()) & (set(DIRECTIONS) | {synthetic.SCORE_PROMPT})
    assert synthetic.SCORE_PROMPT in corpus(["score"])
    assert "move" in synthetic.vocabulary(["motion"]) and "move" not in synthetic.vocabulary()


def test_main_writes_motion_clips(tmp_path):
    argv = ["--out", str(tmp_path), "--train", "4", "--val", "0", "--test", "0"]
    meta = synthetic.main([*argv, "--tasks", "motion", "--frames", "3"])
    assert meta["args"]["frames"] == 3 and meta["counts"]["train"] == {"motion": 4}
    assert VideoReader().info(tmp_path / "videos" / "motion-000000.mp4").num_frames == 3


def test_video_recipe_trains_two_steps_and_answers(tiny_assets, motion, tmp_path):
    """recipes/tiny/video_synthetic.yaml (tiny sizes swapped in): 2 steps, then greedy answers."""
    from lmm.cli import LMMCLI

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "video_synthetic.yaml"
    cli = LMMCLI(
        args=[
            "fit",
            f"--config={recipe}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.precision=32-true",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *tiny_llava_args(tiny_assets),
            "--model.init_args.model.init_args.connector.init_args.merge=1",
            f"--data.init_args.train={motion / 'train.json'}",
            f"--data.init_args.val={motion / 'val.json'}",
            f"--data.init_args.test={motion / 'test.json'}",
            "--data.init_args.batch_size=2",
            f"--data.init_args.max_frames={FRAMES}",
        ]
    )
    assert cli.trainer.global_step == 2
    [results] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert 0.0 <= results["test/accuracy"] <= 1.0
    assert len(cli.model.predictions) == 8
    assert {p["reference"] for p in cli.model.predictions} <= set(DIRECTIONS)


def _tokenizer(data: Path):
    return load_tokenizer(str(build_tokenizer(corpus(synthetic.ALL_TASKS), data / "tokenizer")))
