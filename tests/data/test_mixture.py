"""Mixtures: sampling rules with exact indices, √n balancing, braces, determinism, YAML errors."""

from __future__ import annotations

import json
import logging
import random
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmm.data.mixture import Mixture, SkippedRecord, balanced_counts
from lmm.data.sample import BadRecordError, Sample, VideoRef
from lmm.data.sources import MixtureError, Rule, expand_braces


def _chat(rid: str, images: list[str] | None = None, text: str = "What is it?") -> dict:
    rec = {
        "id": rid,
        "conversation": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": "a shape"},
        ],
    }
    if images is not None:
        rec["images"] = images
    return rec


def _write(path: Path, n: int, prefix: str | None = None, jsonl: bool = False) -> Path:
    """`n` text-only records with ids `{prefix}{i}`, as a JSON array or JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = path.stem if prefix is None else prefix
    records = [_chat(f"{prefix}{i}") for i in range(n)]
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def lmm_log(caplog):
    """caplog for the `lmm` logger (which does not propagate to the root)."""
    logger = logging.getLogger("lmm")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


# --- rules ------------------------------------------------------------------------------------


def test_llava_rules_give_exact_indices(tmp_path):
    for name in ("a", "b", "c", "d"):
        _write(tmp_path / f"{name}.json", 10)
    mix = _yaml(
        tmp_path / "mix.yaml",
        "datasets:\n"
        "  - json_path: a.json\n    sampling_strategy: first:3\n"
        "  - json_path: b.json\n    sampling_strategy: end:2\n"
        "  - json_path: c.json\n    sampling_strategy: random:4\n"
        "  - json_path: d.json\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False, seed=5)
    first, end, rand, whole = m.sources
    assert [s.rule for s in m.sources] == ["first:3", "end:2", "random:4", "all"]
    assert first.indices.tolist() == [0, 1, 2]
    assert end.indices.tolist() == [8, 9]
    # random:N is the first N of a permutation drawn by (seed, crc32(source name))
    expected = np.random.default_rng([5, zlib.crc32(b"c")]).permutation(10)[:4].tolist()
    assert rand.indices.tolist() == expected
    assert len(set(expected)) == 4 and expected != [0, 1, 2, 3]
    assert whole.indices.tolist() == list(range(10))
    assert [(s.size, s.selected, s.count) for s in m.sources] == [
        (10, 3, 3),
        (10, 2, 2),
        (10, 4, 4),
        (10, 10, 10),
    ]
    # without shuffling, an epoch is the sources one after the other, each in rule order
    ids = [rec["id"] for _, _, rec in m.records(0)]
    assert ids[:5] == ["a0", "a1", "a2", "b8", "b9"]
    assert ids[5:9] == [f"c{i}" for i in expected]
    assert len(m) == len(ids) == 19
    path, index, _ = next(m.records(0))
    assert path == str(tmp_path / "a.json") and index == 0


def test_percentages_round_up_and_counts_clip(tmp_path, lmm_log):
    _write(tmp_path / "a.jsonl", 10, jsonl=True)
    for spec, n in [("first:25%", 3), ("end:10%", 1), ("random:50%", 5), ("first:12.5%", 2)]:
        assert Rule.parse(spec).count(10) == n, spec
    assert Rule.parse("first:0%").count(10) == 0
    mix = _yaml(
        tmp_path / "mix.yaml",
        "datasets:\n"
        "  - {json_path: a.jsonl, sampling_strategy: 'first:25%', name: p}\n"
        "  - {json_path: a.jsonl, sampling_strategy: 'end:10%', name: q}\n"
        "  - {json_path: a.jsonl, sampling_strategy: 'first:200', name: r}\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False)
    assert [s.indices.tolist() for s in m.sources] == [[0, 1, 2], [9], list(range(10))]
    assert "asks for 200 records" in lmm_log.text


def test_brace_expansion(tmp_path):
    assert expand_braces("x/{a,b}/y{1,2}.json") == [
        "x/a/y1.json",
        "x/a/y2.json",
        "x/b/y1.json",
        "x/b/y2.json",
    ]
    assert expand_braces("plain.json") == ["plain.json"]
    with pytest.raises(ValueError, match="closed"):
        expand_braces("x/{a,b.json")
    _write(tmp_path / "d" / "a.json", 4)
    _write(tmp_path / "d" / "b.json", 6)
    mix = _yaml(
        tmp_path / "mix.yaml",
        "datasets:\n  - json_path: d/{a,b}.json\n    sampling_strategy: first:50%\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False)
    assert [(s.name, s.path) for s in m.sources] == [
        ("a", str(tmp_path / "d" / "a.json")),
        ("b", str(tmp_path / "d" / "b.json")),
    ]
    # the rule applies to each file on its own: ceil(50% of 4), ceil(50% of 6)
    assert [s.indices.tolist() for s in m.sources] == [[0, 1], [0, 1, 2]]
    # a data path given directly (not a YAML) expands too, each file taken whole
    direct = Mixture.from_path(str(tmp_path / "d" / "{a,b}.json"))
    assert [s.count for s in direct.sources] == [4, 6]
    assert [r["id"] for _, _, r in direct.records(0)][:5] == ["a0", "a1", "a2", "a3", "b0"]


# --- Mantis balancing ---------------------------------------------------------------------------


def test_balancing_by_hand_100_400_900(tmp_path):
    # √n = 10, 20, 30 (Σ 60); total = 1400. Source i gets int(1400 · min(1.1 · √nᵢ / 60, 1)):
    #   1400 · 1.1 · 10/60 = 256.67 → 256;  · 20/60 = 513.33 → 513;  · 30/60 = 770.0 → 770.
    assert balanced_counts([100, 400, 900]) == [256, 513, 770]
    assert balanced_counts([0, 0]) == [0, 0]
    # √n = 1, 100 (Σ 101), total 10001: int(10001 · 1.1/101) = 108; 1.1 · 100/101 > 1 caps at 1
    assert balanced_counts([1, 10_000]) == [108, 10001]
    for name, n in (("small", 100), ("mid", 400), ("big", 900)):
        _write(tmp_path / f"{name}.jsonl", n, jsonl=True)
    mix = _yaml(
        tmp_path / "mantis.yaml",
        "data:\n"
        + "".join(
            f"  - name: {name}\n    type: json\n    path: {name}.jsonl\n"
            "    format: chat\n    split: train\n"
            for name in ("small", "mid", "big")
        ),
    )
    m = Mixture.from_yaml(mix)  # Mantis form, train split: balancing on by default
    assert m.balancing
    assert [s.count for s in m.sources] == [256, 513, 770]
    assert len(m) == 1539
    small, mid, big = m.sources
    # indexed modulo the subset's length: the small source repeats, the big one is cut
    assert small.indices.tolist() == list(range(100)) * 2 + list(range(56))
    assert mid.indices.tolist() == list(range(400)) + list(range(113))
    assert big.indices.tolist() == list(range(770))
    assert len(list(m.records(0))) == 1539
    assert not Mixture.from_yaml(mix, balancing=False).balancing
    assert len(Mixture.from_yaml(mix, balancing=False)) == 1400


def test_mantis_shuffle_and_max_size_follow_mantis(tmp_path, lmm_log):
    _write(tmp_path / "a.json", 20)
    mix = _yaml(
        tmp_path / "mantis.yaml",
        "dataset_balancing: false\n"
        "data:\n"
        "  - name: a\n    path: a.json\n    format: chat\n    split: train\n"
        "    shuffle: true\n    max_size: 5\n"
        "    offline_sha: abc\n    max_image_size: 384\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False)
    data = list(range(20))  # Mantis: random.seed(42); random.shuffle(data); data[:max_size]
    random.seed(42)
    random.shuffle(data)
    assert m.sources[0].indices.tolist() == data[:5]
    assert m.sources[0].rule == "first:5"
    # unknown Mantis fields are kept and named in a warning, not an error
    assert m.sources[0].extra == {"offline_sha": "abc", "max_image_size": 384}
    assert "max_image_size" in lmm_log.text and "offline_sha" in lmm_log.text


def test_split_selects_entries(tmp_path):
    _write(tmp_path / "t.json", 3)
    _write(tmp_path / "v.json", 2)
    mix = _yaml(
        tmp_path / "mantis.yaml",
        "data:\n"
        "  - {name: t, path: t.json, format: chat, split: train}\n"
        "  - {name: v, path: v.json, format: chat, split: val}\n",
    )
    val = Mixture.from_yaml(mix, split="val")
    assert [s.name for s in val.sources] == ["v"] and not val.balancing
    with pytest.raises(MixtureError, match="no source has split 'test'"):
        Mixture.from_yaml(mix, split="test")


# --- determinism --------------------------------------------------------------------------------


def test_epoch_order_is_a_function_of_seed_and_epoch(tmp_path):
    _write(tmp_path / "a.json", 30)
    _write(tmp_path / "b.json", 30)
    mix = _yaml(
        tmp_path / "mix.yaml",
        "datasets:\n  - {json_path: a.json, sampling_strategy: 'random:10'}\n"
        "  - {json_path: b.json}\n",
    )

    def ids(seed: int, epoch: int) -> list[str]:
        return [r["id"] for _, _, r in Mixture.from_yaml(mix, seed=seed).records(epoch)]

    assert ids(0, 0) == ids(0, 0)  # two mixtures, same (seed, epoch): same stream
    assert ids(0, 1) == ids(0, 1)
    assert ids(0, 0) != ids(0, 1) and sorted(ids(0, 0)) == sorted(ids(0, 1))
    assert ids(0, 0) != ids(1, 0)
    # sources are interleaved, not one after the other
    assert {i[0] for i in ids(0, 0)[:15]} == {"a", "b"}
    # random:N is drawn once per seed: every epoch has the same 10 records of a
    assert {i for i in ids(0, 0) if i[0] == "a"} == {i for i in ids(0, 3) if i[0] == "a"}
    assert {i for i in ids(0, 0) if i[0] == "a"} != {i for i in ids(1, 0) if i[0] == "a"}
    with pytest.raises(ValueError, match="epoch"):
        Mixture.from_yaml(mix).order(-1)


# --- bad YAML -----------------------------------------------------------------------------------


def test_bad_yaml_names_file_and_entry(tmp_path):
    _write(tmp_path / "a.json", 3)
    missing = _yaml(
        tmp_path / "missing.yaml",
        "datasets:\n  - json_path: a.json\n  - sampling_strategy: all\n",
    )
    with pytest.raises(MixtureError) as err:
        Mixture.from_yaml(missing)
    assert str(missing) in str(err.value) and "datasets[1]" in str(err.value)
    assert "no 'json_path'" in str(err.value)

    unknown = _yaml(
        tmp_path / "unknown.yaml",
        "datasets:\n  - {json_path: a.json, sampling_strategy: 'foo:3'}\n",
    )
    with pytest.raises(MixtureError) as err:
        Mixture.from_yaml(unknown)
    message = str(err.value)
    assert str(unknown) in message and "datasets[0] (a.json)" in message
    assert "'foo:3'" in message and "first:N" in message

    mantis = _yaml(tmp_path / "mantis.yaml", "data:\n  - {name: nlvr2, format: chat}\n")
    with pytest.raises(MixtureError, match=r"data\[0\] \(nlvr2\): no 'path'"):
        Mixture.from_yaml(mantis)

    absent = _yaml(tmp_path / "absent.yaml", "datasets:\n  - json_path: nope.json\n")
    with pytest.raises(MixtureError, match=r"datasets\[0\] \(nope.json\): data file .* not exist"):
        Mixture.from_yaml(absent)

    both = _yaml(tmp_path / "both.yaml", "data: []\ndatasets: []\n")
    with pytest.raises(MixtureError, match="exactly one of them"):
        Mixture.from_yaml(both)

    bad_format = _yaml(tmp_path / "fmt.yaml", "data:\n  - {name: x, path: a.json, format: chatt}\n")
    with pytest.raises(MixtureError, match=r"data\[0\] \(x\): format 'chatt'"):
        Mixture.from_yaml(bad_format)


# --- samples ------------------------------------------------------------------------------------


@pytest.fixture
def two_folders(tmp_path: Path) -> Path:
    """Two data files in different folders, each with its own images/ next to it."""
    for folder, colour in (("one", (200, 0, 0)), ("two", (0, 200, 0))):
        (tmp_path / folder / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / folder / "images" / "x.png")
    one = [
        _chat("one-1", ["images/x.png"], "<image>\nColour?"),
        _chat("one-3", ["images/x.png"] * 3),
        _chat("one-text"),
    ]
    (tmp_path / "one" / "data.json").write_text(json.dumps(one))
    two = [_chat("two-1", ["images/x.png"]), _chat("two-missing", ["images/nope.png"])]
    (tmp_path / "two" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two))
    with (tmp_path / "two" / "data.jsonl").open("a") as f:
        f.write("{not json\n")
    return tmp_path


def test_samples_resolve_media_per_source_and_count_skips(two_folders, lmm_log):
    mix = _yaml(
        two_folders / "mantis.yaml",
        "dataset_balancing: false\n"
        "data:\n"
        "  - {name: one, path: one/data.json, format: chat, split: train, max_num_images: 2}\n"
        "  - {name: two, path: two/data.jsonl, format: chat, split: train, vl_only: true}\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False)
    items = list(m.samples(0))
    assert len(items) == 6
    ok = [x for x in items if isinstance(x, Sample)]
    assert [s.id for s in ok] == ["one-1", "one-text", "two-1"]
    assert ok[0].images == [two_folders / "one" / "images" / "x.png"]
    assert ok[2].images == [two_folders / "two" / "images" / "x.png"]
    skipped = [x for x in items if isinstance(x, SkippedRecord)]
    assert [x.record_id for x in skipped] == ["one-3"]
    assert "3 images, more than max_num_images=2" in skipped[0].problem
    bad = [x for x in items if isinstance(x, BadRecordError) and not isinstance(x, SkippedRecord)]
    assert [x.record_id for x in bad] == ["two-missing", "line 3"]
    assert "not found" in bad[0].problem and "invalid JSON" in bad[1].problem
    assert "skipped {'one': 1}" in lmm_log.text
    dropped = [x for x in m.samples(0, keep_skipped=False) if isinstance(x, BadRecordError)]
    assert [x.record_id for x in dropped] == ["two-missing", "line 3"]
    # records() hands out raw records and raises on an unreadable one
    with pytest.raises(BadRecordError, match="line 3"):
        list(m.records(0))


def test_vl_only_skips_text_records(tmp_path):
    _write(tmp_path / "t.json", 2)
    mix = _yaml(tmp_path / "m.yaml", "data:\n  - {name: t, path: t.json, vl_only: true}\n")
    items = list(Mixture.from_yaml(mix).samples(0))
    assert len(items) == 2 and all(isinstance(x, SkippedRecord) for x in items)
    assert "vl_only" in items[0].problem


def test_samples_feed_a_train_stream(tmp_path):
    from transformers import AutoTokenizer

    from lmm.data.media import ImageTransform
    from lmm.data.processor import MediaSpec, Processor
    from lmm.data.stream import TrainStream
    from lmm.data.synthetic import corpus
    from lmm.data.templates import Llama3
    from lmm.tiny import build_tokenizer

    class Spec(MediaSpec):
        transform = ImageTransform(8, (0.5,) * 3, (0.5,) * 3)

        def num_image_tokens(self, image_size):
            return 4

    tok = AutoTokenizer.from_pretrained(str(build_tokenizer(corpus(), tmp_path / "tok")))
    _write(tmp_path / "a.json", 5)
    _write(tmp_path / "b.json", 3)
    m = Mixture.from_path(str(tmp_path / "{a,b}.json"))
    stream = TrainStream(
        partial(m.samples, check_media=True), Processor(tok, Llama3(), Spec(), 128), batch_size=3
    )
    planned = list(stream.plan())
    assert [len(p.rows) for p in planned] == [3, 3, 2]
    assert sorted(s.id for p in planned for row in p.rows for s in row) == sorted(
        [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)]
    )


def test_chat_video_frames_and_videos(tmp_path, lmm_log):
    frames = [f"f{i}.png" for i in range(10)]
    for f in frames:
        Image.new("RGB", (8, 8)).save(tmp_path / f)
    records = [
        _chat("frames", frames, "<image>" * 10 + "What happens?"),
        {**_chat("clip"), "video": "clip.mp4"},
    ]
    (tmp_path / "v.json").write_text(json.dumps(records))
    mix = _yaml(
        tmp_path / "m.yaml",
        "data:\n  - {name: v, path: v.json, format: chat_video, max_num_frames: 4, fps: 2}\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False)
    frames_sample, video_sample = list(m.samples(0, check_media=False))
    # Mantis keeps frames arange(0, 10, 10/4) = 0, 2, 5, 7 and moves the markers first
    assert [p.name for p in frames_sample.images] == ["f0.png", "f2.png", "f5.png", "f7.png"]
    assert frames_sample.turns[0].text == "<image>\n" * 4 + "What happens?"
    [video] = video_sample.images
    assert isinstance(video, VideoRef) and video.path == tmp_path / "clip.mp4"
    assert (video.max_frames, video.fps) == (4, 2.0)
    assert m.sources[0].extra == {}  # fps and max_num_frames are used, not warned about


def test_classification_and_unsupported_formats(tmp_path, lmm_log):
    Image.new("RGB", (8, 8)).save(tmp_path / "f.png")
    scored = [
        {"id": "s1", "images": ["f.png"], "prompt": "Rate:", "labels": {"b": 2, "a": 1}},
        {"id": "s2", "images": ["f.png"], "prompt": "Rate:", "labels": {"a": 3, "b": 4}},
        _chat("chatty"),
    ]
    (tmp_path / "s.json").write_text(json.dumps(scored))
    mix = _yaml(
        tmp_path / "m.yaml",
        "dataset_balancing: false\n"
        "data:\n"
        "  - {name: s, path: s.json, format: classification}\n"
        "  - {name: q, path: s.json, format: qwen2_video_classification}\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False)
    assert m.sources[0].labels == ["b", "a"]  # Mantis: label order of the first record
    s1, s2, chatty, *rest = list(m.samples(0))
    assert s1.target == [2.0, 1.0] and s2.target == [4.0, 3.0]
    assert isinstance(chatty, BadRecordError) and "no 'labels'" in chatty.problem
    assert len(rest) == 3 and all(isinstance(x, BadRecordError) for x in rest)
    assert "'qwen2_video_classification'" in rest[0].problem
    assert "not yet supported by lmm" in rest[0].problem
    assert "not yet supported" in lmm_log.text


def test_huggingface_source(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list([_chat(f"hf{i}") for i in range(4)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    mix = _yaml(
        tmp_path / "m.yaml",
        "data:\n  - {name: nlvr2, path: TIGER-Lab/Mantis-Instruct, format: chat, split: train,"
        " revision: script}\n",
    )
    m = Mixture.from_yaml(mix, shuffle=False)
    assert m.sources[0].type == "huggingface"  # Mantis's default type for a non-json path
    assert calls == [("TIGER-Lab/Mantis-Instruct", "nlvr2", "train", {"revision": "script"})]
    assert [s.id for s in m.samples(0)] == ["hf0", "hf1", "hf2", "hf3"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # a misspelt rule: ignored, it would take every record
        ("datasets:\n  - json_path: a.json\n    sampling_stategy: first:2\n", "'sampling_stategy'"),
        ("datasets:\n  - json_path: a.json\n    weight: -1\n", "unknown field 'weight'"),
        (
            "dataset_balanceing: false\ndata:\n  - name: a\n    path: a.json\n",
            "'dataset_balanceing'",
        ),
        ("data:\n  - name: a\n    path: a.json\n    max_num_image: 2\n", "'max_num_image'"),
    ],
)
def test_unknown_mixture_key_is_an_error_naming_the_closest(tmp_path, text, problem):
    _write(tmp_path / "a.json", 4)
    mix = _yaml(tmp_path / "mix.yaml", text)
    with pytest.raises(MixtureError, match=problem) as err:
        Mixture.from_yaml(mix)
    message = str(err.value)
    assert str(mix) in message and "Fix:" in message
    closest = {
        "'sampling_stategy'": "did you mean 'sampling_strategy'?",
        "'dataset_balanceing'": "did you mean 'dataset_balancing'?",
        "'max_num_image'": "did you mean 'max_num_images'?",
    }
    assert closest.get(problem, "known fields:") in message
