"""Readers: Mantis and LLaVA records, marker/image policy, errors that name file and record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lmm.data.formats import load_samples, parse_record
from lmm.data.sample import BadRecordError, Media


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "img" / f"{name}.png")
    return tmp_path


def _write(folder: Path, records, name="data.json", jsonl=False) -> Path:
    path = folder / name
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def test_mantis_record_interleaves_images(folder):
    rec = {
        "id": "m1",
        "images": ["img/a.png", "img/b.png"],
        "conversation": [
            {"role": "user", "content": "<image> vs <image>: same?"},
            {"role": "assistant", "content": "no"},
        ],
    }
    [s] = load_samples(_write(folder, [rec]))
    assert s.id == "m1"
    assert s.turns[0].parts == [Media(0), " vs ", Media(1), ": same?"]
    assert s.turns[1].parts == ["no"]
    assert s.images == [folder / "img/a.png", folder / "img/b.png"]


def test_llava_record_jsonl_and_single_image(folder):
    rec = {
        "id": "l1",
        "image": "img/c.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    [s] = load_samples(_write(folder, [rec], "d.jsonl", jsonl=True))
    assert [t.role for t in s.turns] == ["user", "assistant"]
    assert s.turns[0].parts == [Media(0), "\nWhat is it?"]
    assert s.images == [folder / "img/c.png"]


def test_text_only_record(folder):
    rec = {
        "id": "t",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    [s] = load_samples(_write(folder, [rec]))
    assert s.images == [] and s.turns[0].parts == ["hi"]


def test_images_without_markers_go_first(folder):
    rec = {
        "id": "nomark",
        "images": ["img/a.png", "img/b.png"],
        "conversation": [
            {"role": "user", "content": "Same?"},
            {"role": "assistant", "content": "no"},
        ],
    }
    [s] = load_samples(_write(folder, [rec]))
    assert s.turns[0].parts == [Media(0), "\n", Media(1), "\n", "Same?"]


def test_three_markers_two_images_names_file_and_record(folder):
    rec = {
        "id": "nlvr2-17",
        "images": ["img/a.png", "img/b.png"],
        "conversation": [
            {"role": "user", "content": "<image><image><image> which?"},
            {"role": "assistant", "content": "one"},
        ],
    }
    path = _write(folder, [rec], "train.json")
    with pytest.raises(BadRecordError) as err:
        load_samples(path)
    message = str(err.value)
    assert "'nlvr2-17'" in message and str(path) in message
    assert "3 <image> markers but 2 images" in message


def test_missing_image_names_file_and_record(folder):
    rec = {
        "id": "gone-1",
        "images": ["img/a.png", "img/nope.png"],
        "conversation": [
            {"role": "user", "content": "<image><image>"},
            {"role": "assistant", "content": "x"},
        ],
    }
    path = _write(folder, [rec], "val.json")
    with pytest.raises(BadRecordError) as err:
        load_samples(path)
    message = str(err.value)
    assert "'gone-1'" in message and str(path) in message and "nope.png" in message


@pytest.mark.parametrize("rel", ["/etc/passwd", "../img/a.png"])
def test_path_outside_root_is_refused(folder, rel):
    rec = {"id": "esc", "image": rel, "conversations": [{"from": "human", "value": "<image>"}]}
    with pytest.raises(BadRecordError, match="leaves the data root"):
        parse_record(rec, source=folder / "x.json", check_media=False)
    sample = parse_record(rec, source=folder / "x.json", check_media=False, allow_outside_root=True)
    assert len(sample.images) == 1


def test_unknown_role_and_marker_in_assistant_turn(folder):
    bad_role = {"id": "r", "conversation": [{"role": "robot", "content": "hi"}]}
    with pytest.raises(BadRecordError, match="unknown role 'robot'"):
        parse_record(bad_role, source=folder / "x.json")
    marker = {
        "id": "m",
        "image": "img/a.png",
        "conversation": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<image>"},
        ],
    }
    with pytest.raises(BadRecordError, match="only user turns"):
        parse_record(marker, source=folder / "x.json")


def test_root_overrides_the_data_folder(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    rec = {
        "id": "r",
        "image": "img/a.png",
        "conversations": [{"from": "human", "value": "<image>"}],
    }
    path = _write(other, [rec])
    with pytest.raises(BadRecordError, match="not found"):
        load_samples(path)
    [s] = load_samples(path, root=folder)
    assert s.images == [folder / "img/a.png"]
