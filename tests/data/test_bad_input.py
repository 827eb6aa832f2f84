"""Bad input, one test per kind: a clear error naming file and record, or a counted skip.

Kinds covered elsewhere: missing image, marker mismatch, unknown role, path escaping the
root (test_formats.py); corrupt image, over-length (test_processor.py); unreadable,
truncated and too-short videos at the reader level (test_video.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lmm.data import media
from lmm.data.formats import load_samples, read_records
from lmm.data.media import ImageTransform
from lmm.data.processor import MediaSpec, Processor
from lmm.data.sample import BadRecordError
from lmm.data.stream import TrainStream
from lmm.data.templates import Llama3
from lmm.data.tokenization import load_tokenizer
from tests.data.test_video import write_video


class _Spec(MediaSpec):
    transform = ImageTransform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")

    def num_image_tokens(self, image_size):
        return 4


@pytest.fixture
def processor(tiny_assets):
    return Processor(load_tokenizer(str(tiny_assets["tokenizer"])), Llama3(), _Spec(), 256)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "ok.png")
    return tmp_path


def _chat(rid: str, user: str = "<image>\nWhat colour?", answer: str = "green", **media):
    rec = {"id": rid, "conversation": [{"role": "user", "content": user}]}
    rec["conversation"].append({"role": "assistant", "content": answer})
    return {**rec, **media}


def _write(folder: Path, records, name="data.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def _names(err: BadRecordError, path: Path, rid: str) -> None:
    assert str(path) in str(err) and repr(rid) in str(err), str(err)


def test_empty_conversation(folder):
    path = _write(folder, [{"id": "e1", "image": "ok.png", "conversation": []}])
    with pytest.raises(BadRecordError, match="empty conversation") as err:
        load_samples(path)
    _names(err.value, path, "e1")


def test_assistant_first(folder, processor):
    rec = {
        "id": "a1",
        "conversation": [
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "hello"},
        ],
    }
    path = _write(folder, [rec])
    [sample] = load_samples(path)
    with pytest.raises(BadRecordError, match="turn 0 is 'assistant'") as err:
        processor(sample)
    _names(err.value, path, "a1")


def test_non_utf8_line_is_a_bad_record(folder):
    good = json.dumps(_chat("u0", image="ok.png")).encode()
    bad = b'{"id": "u1", "conversation": [{"role": "user", "content": "caf\xe9"}]}'
    path = folder / "data.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n")
    items = [rec for _, rec in read_records(path)]
    assert items[0]["id"] == "u0"
    assert isinstance(items[1], BadRecordError)
    assert "not UTF-8" in str(items[1]) and "line 2" in str(items[1]) and str(path) in str(items[1])
    with pytest.raises(BadRecordError, match="not UTF-8"):
        load_samples(path)


def test_decompression_bomb(folder, processor, monkeypatch):
    Image.new("RGB", (64, 64)).save(folder / "big.png")
    path = _write(folder, [_chat("b1", image="big.png")])
    [sample] = load_samples(path)
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 32 * 32)
    with pytest.raises(BadRecordError, match="4096 pixels, more than the limit") as err:
        processor(sample)
    _names(err.value, path, "b1")


def test_unreadable_and_truncated_video(folder, processor):
    video = write_video(folder / "v.mp4", n=30)
    data = video.read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])
    (folder / "text.mp4").write_text("not a video")
    recs = [
        _chat(f"v-{name}", user="<video>\nWhat happens?", video=f"{name}.mp4")
        for name in ("v", "cut", "text")
    ]
    path = _write(folder, recs)
    good, cut, text = load_samples(path)
    features = processor(good)
    assert features.pixel_values.shape[0] == 8  # 8 frames sampled, one marker
    assert int((features.input_ids == processor.image_token_id).sum()) == 8 * 4
    for sample in (cut, text):
        with pytest.raises(BadRecordError, match="video") as err:
            processor(sample)
        _names(err.value, path, sample.id)


def test_fewer_frames_than_asked(folder, processor):
    write_video(folder / "short.mp4", n=5)
    path = _write(folder, [_chat("s1", user="<video>\nWhat?", video="short.mp4")])
    from lmm.data.formats import VideoOptions

    [sample] = load_samples(path, video=VideoOptions(max_frames=8, min_frames=8))
    with pytest.raises(BadRecordError, match="5 frames but min_frames=8") as err:
        processor.length(sample)
    _names(err.value, path, "s1")


def test_skip_counts_bad_records(folder, processor):
    records = [_chat(f"ok{i}", image="ok.png") for i in range(5)]
    records.insert(2, _chat("gone", image="missing.png"))
    records.insert(4, {"id": "norole", "conversation": [{"role": "robot", "content": "x"}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    from lmm.data.formats import iter_samples

    def source(epoch):
        return iter_samples(read_records(path), source=path)

    stream = TrainStream(source, processor, batch_size=2, on_bad_record="skip", buffer_size=16)
    batches = list(stream)
    assert sum(len(b.ids) for b in batches) == 5
    assert sum(b.skipped for b in batches) == 3
    with pytest.raises(BadRecordError, match="'gone'"):
        list(TrainStream(source, processor, batch_size=2, on_bad_record="raise"))
