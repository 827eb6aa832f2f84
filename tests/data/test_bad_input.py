"""Bad input, one test per kind: a clear error naming file and record, or a counted skip.

Kinds covered elsewhere: missing image, marker mismatch, unknown role, path escaping the
root (test_formats.py); corrupt image, over-length (test_processor.py); unreadable,
truncated and too-short videos at the reader level (test_video.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from lmm.data import media
from lmm.data.datamodule import ChatDataModule
from lmm.data.formats import load_samples, read_records
from lmm.data.sample import BadRecordError
from lmm.data.stream import NoUsableRecordsError, TrainStream
from lmm.data.templates import Llama3
from tests.data.bad_input import TinySpec
from tests.data.test_video import write_video


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


# --- issue 17: nothing hangs, nothing silently wrong ------------------------------------


def _stream(path: Path, processor, on_bad_record: str, **kwargs) -> TrainStream:
    from lmm.data.formats import iter_samples

    def source(epoch):
        return iter_samples(read_records(path), source=path)

    return TrainStream(source, processor, on_bad_record=on_bad_record, **kwargs)


def _skips(path: Path, processor, batch_size: int = 2) -> tuple[list[str], int]:
    """The ids trained and the records counted as skipped in one epoch with `skip`."""
    batches = list(_stream(path, processor, "skip", batch_size=batch_size, buffer_size=16))
    return [i for b in batches for i in b.ids], sum(b.skipped for b in batches)


def test_skip_with_every_record_bad_stops_naming_them(folder, processor):
    path = _write(folder, [_chat(f"gone{i}", image="missing.png") for i in range(3)])
    with pytest.raises(NoUsableRecordsError, match="every one of the 3 training records") as err:
        list(_stream(path, processor, "skip", batch_size=2))
    assert "'gone0'" in str(err.value) and str(path) in str(err.value)
    assert "Fix:" in str(err.value)
    with pytest.raises(BadRecordError, match="'gone0'"):
        list(_stream(path, processor, "raise", batch_size=2))


def test_empty_training_file_stops(folder, processor):
    path = folder / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(NoUsableRecordsError, match="has no records"):
        list(_stream(path, processor, "skip", batch_size=2))


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_byte_order_mark(folder, name):
    records = [_chat("b0", image="ok.png"), _chat("b1", image="ok.png")]
    path = folder / name
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=2)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [s.id for s in load_samples(path)] == ["b0", "b1"]


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_json_file_holding_one_object(folder, bom):
    path = folder / "one.json"
    path.write_bytes(bom + json.dumps(_chat("solo", image="ok.png"), indent=2).encode())
    [sample] = load_samples(path)
    assert sample.id == "solo" and sample.turns[1].text == "green"


def test_json_array_with_trailing_comma_names_the_file(folder):
    path = folder / "data.json"
    path.write_text("[\n" + json.dumps(_chat("t0", image="ok.png")) + ",\n]\n")
    with pytest.raises(BadRecordError, match=r"invalid JSON at line 3, column 1") as err:
        load_samples(path)
    assert str(path) in str(err.value) and "trailing comma" in str(err.value)


def test_batch_of_only_bad_records_is_an_empty_counted_batch(folder, processor):
    # found by the reader, refused when the processor decodes them: the plan has them
    (folder / "fake.png").write_text("not an image")
    path = _write(folder, [_chat("fake1", image="fake.png"), _chat("fake2", image="fake.png")])
    [batch] = list(_stream(path, processor, "skip", batch_size=2))
    assert len(batch) == 0 and batch.stream_position == (0, 0)
    assert sorted(r[1] for r in batch.skipped_records) == ["fake1", "fake2"]
    assert all(r[0] == str(path) for r in batch.skipped_records)
    with pytest.raises(BadRecordError, match="'fake"):
        list(_stream(path, processor, "raise", batch_size=2))


def test_rank_whose_rows_are_all_bad_takes_a_masked_row(folder, processor):
    (folder / "fake.png").write_text("not an image")
    path = _write(folder, [_chat("fake", image="fake.png"), _chat("good", image="ok.png")])
    streams = [_stream(path, processor, "skip", batch_size=1) for _ in range(2)]
    for rank, stream in enumerate(streams):
        stream.rank, stream.world_size = rank, 2
    [b0], [b1] = (list(s) for s in streams)
    assert b0.ids == b1.ids == ["good"]  # the rank of `fake` trains a masked copy of `good`
    masked = b0 if (b0.labels == -100).all() else b1
    assert (masked.labels == -100).all() and masked.skipped == 1
    assert sum(b.skipped for b in (b0, b1)) == 1


def _streaming_data(folder: Path, processor, on_bad_record: str) -> ChatDataModule:
    good = [json.dumps(_chat(f"s{i}", image="ok.png")).encode() for i in range(3)]
    lines = [
        good[0],
        b'{"id": "s-broken", "conversation": [',
        good[1],
        b'{"id": "caf\xe9"}',
        good[2],
    ]
    path = folder / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    dm = ChatDataModule(
        Llama3(), train=str(path), streaming=True, batch_size=2, on_bad_record=on_bad_record
    )
    dm.connect(processor.tokenizer, TinySpec())
    return dm


def test_streaming_malformed_and_non_utf8_lines(folder, processor):
    batches = list(_streaming_data(folder, processor, "skip").train_stream())
    assert sorted(i for b in batches for i in b.ids) == ["s0", "s1", "s2"]
    assert sum(b.skipped for b in batches) == 2
    with pytest.raises(BadRecordError, match="'line 2'.*invalid JSON") as err:
        list(_streaming_data(folder, processor, "raise").train_stream())
    assert "train.jsonl" in str(err.value)


def test_pack_tokens_below_max_length_refused(folder):
    path = _write(folder, [_chat("p0", image="ok.png")])
    with pytest.raises(ValueError, match="pack_tokens=64 is smaller than data.max_length=256"):
        ChatDataModule(Llama3(), train=str(path), pack_tokens=64, max_length=256)
    ChatDataModule(Llama3(), train=str(path), pack_tokens=256, max_length=256)  # equal is fine


def _scored(rid: str, value) -> dict:
    return {"id": rid, "images": ["ok.png"], "prompt": "<image> rate it", "labels": {"q": value}}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("3", "not a number"),
        (True, "not a number"),
        (None, "not a number"),
        (float("nan"), "not a finite float32"),
        (float("inf"), "not a finite float32"),
        (float("-inf"), "not a finite float32"),
        (1e39, "not a finite float32"),
        (10**40, "not a finite float32"),
    ],
)
def test_score_label_must_be_a_finite_number(folder, processor, value, problem):
    path = folder / "scores.jsonl"
    records = [_chat("c0", image="ok.png"), _scored("bad", value), _chat("c1", image="ok.png")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(BadRecordError, match=f"label 'q' is .*{problem}") as err:
        load_samples(path, labels=["q"])
    _names(err.value, path, "bad")
    ids, skipped = _skips(path, processor)
    assert sorted(ids) == ["c0", "c1"] and skipped == 1


def test_score_label_numbers_are_kept(folder):
    path = _write(folder, [_scored("g", 2), _scored("h", -3.4e38)])
    assert [s.target for s in load_samples(path, labels=["q"])] == [[2.0], [-3.4e38]]


@pytest.mark.parametrize(
    ("user", "answer", "turn"),
    [
        ("", "green", "turn 0 (user)"),
        ("<image>\nColour?", "", "turn 1 (assistant)"),
        ("<image>\nColour?", "  \n", "turn 1 (assistant)"),
    ],
)
def test_empty_turn_is_a_bad_record(folder, processor, user, answer, turn):
    records = [_chat("k0", image="ok.png"), _chat("empty", user, answer, image="ok.png")]
    path = _write(folder, records)
    with pytest.raises(BadRecordError, match=rf"{re.escape(turn)} is empty") as err:
        load_samples(path)
    _names(err.value, path, "empty")
    ids, skipped = _skips(path, processor)
    assert ids == ["k0"] and skipped == 1


_FIT = """
import sys, torch
from pathlib import Path
from tests.helpers import quiet_trainer, tiny_data, tiny_llava
assets = {k: Path(sys.argv[1]) / k for k in ("tokenizer", "llm", "vision")}
module = tiny_llava(assets)
data = tiny_data(Path(sys.argv[2]), module, batch_size=2, on_bad_record="skip")
quiet_trainer(Path(sys.argv[2]), max_steps=3, callbacks=[]).fit(module, datamodule=data)
"""


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("missing.png", "every one of the 4 training records is bad"),  # the reader's
        ("fake.png", "no sample of its 2 batches could be loaded"),  # the processor's
    ],
)
def test_fit_with_skip_on_all_bad_records_ends_with_a_clear_error(
    tiny_assets, tmp_path, image, message
):
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    data.mkdir()
    (data / "fake.png").write_text("not an image")
    bad = [_chat(f"gone{i}", image=image) for i in range(4)]
    for split in ("train", "val", "test"):
        _write(data, bad if split == "train" else [], f"{split}.json")
    root = tiny_assets["tokenizer"].parent
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", _FIT, str(root), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert time.monotonic() - start < 60
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-3000:]
    assert "'gone0'" in run.stderr and "train.json" in run.stderr


def test_fit_skips_the_step_of_an_all_bad_batch(tiny_assets, tmp_path):
    from tests.helpers import quiet_trainer, tiny_data, tiny_llava

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(data / "ok.png")
    (data / "fake.png").write_text("not an image")
    records = [_chat("fake0", image="fake.png"), _chat("fake1", image="fake.png")]
    records += [_chat("good0", image="ok.png"), _chat("good1", image="ok.png")]
    # streamed in file order, blocks of 2: batch 0 is the two fakes, batch 1 the two goods
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    module = tiny_llava(tiny_assets)
    dm = tiny_data(data, module, batch_size=2, buffer_size=2, on_bad_record="skip")
    dm.files.update(train=str(data / "train.jsonl"), val=None, test=None)
    dm.streaming = True
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[])
    trainer.fit(module, datamodule=dm)
    [skips] = [c for c in trainer.callbacks if type(c).__name__ == "SkippedRecords"]
    assert (skips.skipped, skips.skips) == (2, 2) and trainer.global_step == 2

    steps = {int(s["step"]) for s in trainer.optimizers[0].state_dict()["state"].values()}
    assert steps == {1}  # one optimizer update: the empty batch's step changed nothing
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())
