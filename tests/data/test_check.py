"""`lmm data check`: exact counts, bad records by id, histograms, padded vs packed token share."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lmm.data.check import check, histogram, main, packed_share, padded_share


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from lmm.data.synthetic import corpus
    from lmm.tiny import build_tokenizer

    return build_tokenizer(corpus(), tmp_path_factory.mktemp("tok") / "tokenizer")


def test_shares_and_histogram_by_hand():
    # batches [3, 1] and [2, 2] padded to 3 and 2: 8 real of 2·3 + 2·2 = 10
    assert padded_share([3, 1, 2, 2], 2) == pytest.approx(0.8)
    # first-fit decreasing into rows of 4: [3, 1], [2, 2] → one batch of two full rows
    assert packed_share([3, 1, 2, 2], 4, 2, 1024) == (1.0, 2)
    # rows [3], [3], [2] in one batch padded to 3: 8 real of 9
    assert packed_share([3, 3, 2], 4, 3, 1024) == (pytest.approx(8 / 9), 3)
    # width ceil(10 / 3) = 4 from 1: [1-4] holds 1, 2, 3; [9-12] holds 10
    assert histogram([1, 2, 3, 10], 3) == [
        {"from": 1, "to": 4, "count": 3},
        {"from": 5, "to": 8, "count": 0},
        {"from": 9, "to": 12, "count": 1},
    ]
    assert padded_share([], 4) is None


def test_check_synthetic_data(synthetic_data, tokenizer_dir, capsys):
    train = synthetic_data / "train.json"
    records = json.loads(train.read_text())
    args = dict(tokenizer=str(tokenizer_dir), max_length=256, batch_size=4)
    report = check(train, image_tokens=16, **args)
    assert report["total"] == {
        "size": 64,
        "distinct": 64,
        "epoch": 64,
        "ok": 64,
        "bad": 0,
        "skipped": 0,
    }
    assert report["bad"] == []
    expected_images = Counter(len(r["images"]) for r in records)
    assert report["images"]["histogram"] == dict(sorted(expected_images.items()))
    tokens = report["tokens"]
    assert sum(b["count"] for b in tokens["histogram"]) == 64
    # each image counts --image-tokens tokens: 10 more per image raise the mean by 10 · images
    more = check(train, image_tokens=26, **args)["tokens"]
    mean_images = sum(len(r["images"]) for r in records) / 64
    assert more["mean"] - tokens["mean"] == pytest.approx(10 * mean_images, abs=0.1)
    batches = report["batches"]
    assert batches["pack_tokens"] == 256 and batches["too_long_to_pack"] == 0
    assert 0 < batches["padded_share"] < 1
    assert batches["packed_share"] >= batches["padded_share"]
    out = capsys.readouterr().out
    assert "tokens per sample" in out and "images per sample" in out and "packed" in out


def _with_two_bad(tmp_path: Path, synthetic_data: Path) -> Path:
    good = json.loads((synthetic_data / "train.json").read_text())[:6]
    first = good[0]
    missing = {**first, "id": "bad-missing", "images": ["images/nope.png"]}
    markers = {
        **first,
        "id": "bad-markers",
        "conversation": [
            {"role": "user", "content": "<image> and <image>?"},
            {"role": "assistant", "content": "red"},
        ],
    }
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good[:3], missing, *good[3:], markers]))
    return path


def test_main_lists_bad_records(tmp_path, synthetic_data, tokenizer_dir, capsys):
    path = _with_two_bad(tmp_path, synthetic_data)
    argv = ["check", str(path), "--root", str(synthetic_data), "--tokenizer", str(tokenizer_dir)]
    argv += ["--image-tokens", "16", "--max-length", "256", "--batch-size", "2"]
    report = main(argv)
    assert [(r["ok"], r["bad"], r["epoch"]) for r in report["sources"]] == [(6, 2, 8)]
    assert [(b["id"], b["index"], b["file"]) for b in report["bad"]] == [
        ("bad-missing", 3, str(path)),
        ("bad-markers", 7, str(path)),
    ]
    assert "image 0 not found" in report["bad"][0]["problem"]
    assert "2 <image> markers but 1 images" in report["bad"][1]["problem"]
    out = capsys.readouterr().out
    assert "bad records (2):" in out and "[bad-missing]" in out and "[bad-markers]" in out
    assert report["batches"]["packed_share"] >= report["batches"]["padded_share"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--strict"])
    assert exit_info.value.code == 1


def test_lmm_data_check_command(tmp_path, synthetic_data, capsys):
    from lmm.cli import main as lmm_main

    path = _with_two_bad(tmp_path, synthetic_data)
    lmm_main(["data", "check", str(path), "--root", str(synthetic_data)])
    out = capsys.readouterr().out
    assert f"lmm data check: {path}" in out and "bad records (2):" in out
    assert "tokens per sample" not in out  # no tokenizer: validation and images only


def test_check_mixture_with_balancing_and_skips(tmp_path, synthetic_data):
    train, val = synthetic_data / "train.json", synthetic_data / "val.json"
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        "data:\n"
        f"  - {{name: shapes, path: {train}, format: chat, split: train, max_num_images: 2}}\n"
        f"  - {{name: held, path: {val}, format: chat, split: train}}\n"
    )
    report = check(mix)
    # 64 and 16 records: √ 8 and 4 (Σ 12), total 80 → int(80·1.1·8/12) = 58, int(80·1.1·4/12) = 29
    shapes, held = report["sources"]
    assert (shapes["epoch"], held["epoch"]) == (58, 29)
    assert (held["distinct"], held["ok"]) == (16, 16)  # 29 = every record once, 13 twice
    three = sum(len(r["images"]) > 2 for r in json.loads(train.read_text())[:58])
    assert three > 0
    assert (shapes["distinct"], shapes["skipped"], shapes["ok"]) == (58, three, 58 - three)
    assert all("more than max_num_images=2" in s["problem"] for s in report["skipped"])
    assert report["balancing"] and report["tokens"] is None and report["batches"] is None
