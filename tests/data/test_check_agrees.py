"""`lmm data check` finds exactly the records fit skips: one training file holding 40-odd
kinds of broken record (reader, template, length, media) and good records of every pixel
format, checked by `check` and trained for one epoch with `on_bad_record: skip`."""

from __future__ import annotations

import json
import struct
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lmm.cli import data
from lmm.data.check import check
from lmm.data.datamodule import ChatDataModule
from lmm.data.mixture import Mixture
from lmm.data.policy import Preprocessing
from lmm.data.processor import Processor
from lmm.data.stream import TrainStream
from lmm.data.templates import Llama3
from lmm.data.tokenization import load_tokenizer
from tests.data.bad_input import TinySpec
from tests.data.test_video import write_video

LABELS = ["q", "r"]  # the score names of the file's scored records
POLICY = Preprocessing(truncation="refuse")  # a sample longer than max_length is a bad record
MAX_LENGTH = 128
ALL_ROWS = 64  # every sample of the file in one batch: no batch is lost whole


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_bomb(path: Path, side: int = 12_000) -> Path:
    """A grey PNG of side² pixels (144 M, over lmm's 100 M) in 140 KB: zeros compress well."""
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one byte per pixel
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def write_empty_video(path: Path) -> Path:
    """An MP4 container with its header written and not one frame."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


def write_media(root: Path) -> None:
    """Every media file the records name: good ones of unusual formats and broken ones."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "ok.png")
    Image.fromarray(np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)).save(
        root / "g16.png"
    )
    Image.new("CMYK", (8, 8), (10, 200, 30, 40)).save(root / "cmyk.jpg")
    palette = Image.new("P", (8, 8))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.save(root / "pt.png", transparency=0)
    Image.new("LA", (8, 8), (50, 128)).save(root / "la.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(root / "rgba.png")
    Image.new("1", (8, 8), 1).save(root / "bits.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(root / "unit.tif")
    Image.new("RGB", (8, 8), (9, 9, 200)).save(root / "still.gif")
    write_video(root / "clip.mp4", n=10)
    # broken images: decoding finds them, headers do not
    (root / "zero.png").write_bytes(b"")
    Image.fromarray(noise).save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(noise).save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.png").write_text("not an image\n")
    write_video(root / "video.mp4", n=3).rename(root / "video_as.png")
    write_bomb(root / "bomb.png")
    Image.new("L", (1, 20_000)).save(root / "thin.png", optimize=True)
    Image.fromarray(np.array([[0.0, 200.0]], np.float32), "F").save(root / "hot.tif")
    Image.fromarray(np.array([[-5, 7]], np.int32), "I").save(root / "neg.tif")
    # broken videos
    Image.new("RGB", (16, 16)).save(root / "still.mp4", format="PNG")
    data = write_video(root / "moov_end.mp4", n=30).read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index is lost: no header
    data = write_video(root / "moov_first.mp4", n=30, faststart=True).read_bytes()
    (root / "cut_fast.mp4").write_bytes(data[: len(data) // 2])  # header promises 30 frames
    (root / "zero.mp4").write_bytes(b"")
    write_empty_video(root / "no_frames.mp4")
    (root / "notes.mp4").write_text("these are not the frames you are looking for\n" * 20)


def _chat(rid: str, user: str = "<image>\nWhat colour?", answer: str = "green", **media):
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": rid, "conversation": turns, **media}


def _video(rid: str, video: str) -> dict:
    return _chat(rid, "<video>\nWhat happens?", "stripes", video=video)


def _scored(rid: str, **labels) -> dict:
    return {"id": rid, "images": ["ok.png"], "prompt": "<image> rate it", "labels": labels}


GOOD = [
    _chat("good-png", image="ok.png"),
    _chat("good-16bit-png", image="g16.png"),
    _chat("good-cmyk-jpeg", image="cmyk.jpg"),
    _chat("good-palette-transparent", image="pt.png"),
    _chat("good-grey-alpha", image="la.png"),
    _chat("good-rgba", image="rgba.png"),
    _chat("good-bilevel", image="bits.png"),
    _chat("good-float-tiff", image="unit.tif"),
    _chat("good-gif", image="still.gif"),
    _chat("good-two-images", "<image> and <image>?", "both", images=["ok.png", "pt.png"]),
    _chat("good-unmarked", "What colour?", images=["ok.png"]),
    _chat("good-text-only", "Say hi.", "hi"),
    _video("good-video", "clip.mp4"),
    {
        "id": "good-llava",
        "image": "ok.png",
        "conversations": [
            {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "green"},
        ],
    },
    {
        "id": "good-system",
        "image": "ok.png",
        "conversation": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nColour?"},
            {"role": "assistant", "content": "green"},
        ],
    },
]

# refused by the reader (parse, paths, labels): found with or without --fast
READER = [
    _chat("unknown-role") | {"conversation": [{"role": "robot", "content": "x"}]},
    {"id": "empty-conversation", "image": "ok.png", "conversation": []},
    _chat("empty-user-turn", "", image="ok.png"),
    _chat("blank-answer", answer="  \n", image="ok.png"),
    _chat("markers-vs-images", "<image> and <image>?", images=["ok.png"]),
    _chat("missing-image", image="nope.png"),
    _chat("escapes-root", image="../outside/secret.png"),
    _chat("symlink-out-of-root", image="leak.png"),
    _chat("absolute-path", image="ABSOLUTE"),  # the real path is filled in by `write_file`
    _chat("images-and-video", images=["ok.png"], video="clip.mp4"),
    _chat("marker-in-answer", "What?", "<image> here", image="ok.png"),
    _chat("turn-not-object") | {"conversation": ["hello", {"role": "assistant", "content": "x"}]},
    _video("video-not-a-path", "clip.mp4") | {"video": 3},
    _chat("image-not-a-path", images=[3]),
    _video("missing-video", "nope.mp4"),
    _scored("score-string", q="3", r=1),
    _scored("score-nan", q=float("nan"), r=1),
    _scored("score-inf", q=float("inf"), r=1),
    _scored("score-bool", q=True, r=1),
    _scored("score-null", q=None, r=1),
    _scored("score-over-float32", q=1e39, r=1),
    _scored("score-missing-dimension", q=1),
    _scored("score-extra-dimension", q=1, r=2, s=3),
    {"id": "score-no-prompt", "images": ["ok.png"], "labels": {"q": 1, "r": 2}},
]
# refused by the template or Processor.length (headers, frame counts): found with --fast
LENGTH = [
    _chat("assistant-first") | {"conversation": [{"role": "assistant", "content": "hi"}]},
    _chat("too-long-refused", answer=" ".join(["green"] * 300), image="ok.png"),
    _video("png-named-mp4", "still.mp4"),
    _video("truncated-mp4-no-index", "cut.mp4"),
    _video("zero-byte-mp4", "zero.mp4"),
    _video("video-without-frames", "no_frames.mp4"),
    _video("text-named-mp4", "notes.mp4"),
]
# refused only when decoded (Processor.__call__): missed by --fast
MEDIA = [
    _chat("zero-byte-png", image="zero.png"),
    _chat("truncated-png", image="cut.png"),
    _chat("truncated-jpeg", image="cut.jpg"),
    _chat("text-named-png", image="text.png"),
    _chat("mp4-named-png", image="video_as.png"),
    _chat("decompression-bomb", image="bomb.png"),
    _chat("1x20000-png", image="thin.png"),
    _chat("float-tiff-out-of-range", image="hot.tif"),
    _chat("negative-int-tiff", image="neg.tif"),
    _video("truncated-mp4-frames-missing", "cut_fast.mp4"),
]
# lines that are not a record: the reader names them by line
LINES = [b'{"id": "broken-json", "conversation": [', b'{"id": "caf\xe9"}', b"[1, 2]"]


def write_file(tmp_path: Path) -> tuple[Path, dict[str, set[str]]]:
    """The training file (JSON lines, good and bad records interleaved) and its ids by kind."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    (root / "leak.png").symlink_to(outside / "secret.png")
    write_media(root)
    records = [*READER, *LENGTH, *MEDIA]
    records[records.index(READER[8])] = _chat("absolute-path", image=str(outside / "secret.png"))
    lines = [json.dumps(r).encode() for r in records] + LINES
    rng = np.random.default_rng(1)
    lines = [lines[i] for i in rng.permutation(len(lines))]
    for k, good in enumerate(GOOD):  # good records spread between the bad ones
        lines.insert(3 * k, json.dumps(good).encode())
    path = root / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    line_ids = {f"line {lines.index(raw) + 1}" for raw in LINES}
    kinds = {
        "good": {r["id"] for r in GOOD},
        "reader": {r["id"] for r in READER} | line_ids,
        "length": {r["id"] for r in LENGTH},
        "media": {r["id"] for r in MEDIA},
    }
    assert sum(map(len, kinds.values())) == len(lines) == 59
    return path, kinds


def _processor(tokenizer) -> Processor:
    return Processor(tokenizer, Llama3(), TinySpec(), MAX_LENGTH, policy=POLICY)


def _skipped(batches) -> tuple[set[tuple[str, str, str]], list[str]]:
    """The records skipped over the epoch (file, id, problem) and the ids trained."""
    skipped = [r for b in batches for r in b.skipped_records]
    assert len(skipped) == len(set(skipped))  # each skipped record counted once
    return set(skipped), sorted(i for b in batches for i in b.ids)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # ours refuses it
def test_data_check_agrees_with_fit(tiny_assets, tmp_path):
    path, kinds = write_file(tmp_path)
    tokenizer = load_tokenizer(str(tiny_assets["tokenizer"]))
    processor = _processor(tokenizer)

    report = check(path, processor=processor, labels=LABELS)
    found = {(b["file"], b["id"], b["problem"]) for b in report["bad"]}

    # fit over a mixture of the file (what a mixture YAML trains through) ...
    mixture = Mixture.from_path(path, labels=LABELS)
    samples = partial(mixture.samples, policy=processor.policy)
    stream = TrainStream(samples, processor, batch_size=ALL_ROWS, on_bad_record="skip")
    skipped, trained = _skipped(list(stream))
    # ... and through the data module a recipe builds, its own processor connected
    dm = ChatDataModule(
        Llama3(),
        train=str(path),
        batch_size=ALL_ROWS,
        max_length=MAX_LENGTH,
        on_bad_record="skip",
        labels=LABELS,
        preprocessing=POLICY,
    )
    dm.connect(tokenizer, TinySpec())
    dm_skipped, dm_trained = _skipped(list(dm.train_stream()))

    assert found and found == skipped == dm_skipped  # same records, same problems
    bad_ids = {rid for _, rid, _ in found}
    assert bad_ids == kinds["reader"] | kinds["length"] | kinds["media"]
    assert {file for file, _, _ in found} == {str(path)}
    assert trained == dm_trained == sorted(kinds["good"])
    total = report["total"]
    assert (total["ok"], total["bad"], total["skipped"]) == (len(GOOD), len(bad_ids), 0)
    assert report["media"] == "decoded" and report["images"]["histogram"] == {0: 1, 1: 13, 2: 1}

    # --fast reads headers only: the broken files that only decoding finds pass
    fast = check(path, processor=processor, labels=LABELS, fast=True)
    fast_ids = {b["id"] for b in fast["bad"]}
    assert fast_ids < bad_ids and bad_ids - fast_ids == kinds["media"]
    assert fast["total"]["ok"] == len(GOOD) + len(MEDIA)

    # without a tokenizer the media are still decoded: only the token-level refusals are left
    plain = check(path, labels=LABELS)
    assert plain["tokens"] is None and plain["tokens_counted_by"] is None
    assert {b["id"] for b in plain["bad"]} == bad_ids - {"assistant-first", "too-long-refused"}
    no_media = check(path, labels=LABELS, check_media=False)
    assert no_media["media"] == "unchecked"
    assert "zero-byte-png" not in {b["id"] for b in no_media["bad"]}


def _recipe_args(assets: dict[str, Path]) -> list[str]:
    """The tiny LLaVA recipe pointed at the tiny assets, as `lmm fit` overrides are given."""
    return [
        f"--model.init_args.tokenizer={assets['tokenizer']}",
        f"--model.init_args.model.init_args.vision.init_args.path={assets['vision']}",
        f"--model.init_args.model.init_args.llm.init_args.path={assets['llm']}",
    ]


def test_cli_recipe_counts_tokens_with_the_model_processor(
    tiny_assets, synthetic_data, tmp_path, monkeypatch, capsys, caplog
):
    from lmm.data.check import histogram
    from lmm.data.formats import load_samples
    from lmm.training.recipe import build_module

    recipe = Path(__file__).parents[2] / "recipes/tiny/llava_synthetic.yaml"
    train = synthetic_data / "train.json"
    report = data(["check", str(train), "--recipe", str(recipe), *_recipe_args(tiny_assets)])
    out = capsys.readouterr().out
    assert "tokens counted with the media spec LlavaMediaSpec" in out

    # the model fit trains (built with its weights): its processor's lengths are check's
    config = yaml.safe_load(recipe.read_text())
    init = config["model"]["init_args"]
    init["tokenizer"] = str(tiny_assets["tokenizer"])
    init["model"]["init_args"]["vision"]["init_args"]["path"] = str(tiny_assets["vision"])
    init["model"]["init_args"]["llm"]["init_args"]["path"] = str(tiny_assets["llm"])
    module = build_module(config)
    media = module.media_spec()
    model = Processor(module.tokenizer, Llama3(), media, 256, module.image_token)
    lengths = [model.length(s) for s in load_samples(train)]
    assert media.num_image_tokens((32, 32)) == 4  # not the stub's 576 per image
    tokens = report["tokens"]
    assert (tokens["min"], tokens["max"]) == (min(lengths), max(lengths))
    assert tokens["mean"] == round(sum(lengths) / len(lengths), 1)
    assert tokens["histogram"] == histogram(lengths, 10)
    assert report["batches"]["pack_tokens"] == 256 and report["batches"]["batch_size"] == 8
    assert report["total"]["ok"] == 64

    # without the overrides the recipe's assets/tiny is not here: the stub, and a note
    monkeypatch.chdir(tmp_path)
    args = ["--tokenizer", str(tiny_assets["tokenizer"]), "--image-tokens", "20"]
    stub = data(["check", str(train), "--recipe", str(recipe), *args])
    assert "its model cannot be built here" in caplog.text and "Fix:" in caplog.text
    assert "a stub media spec (20 tokens per image)" in stub["tokens_counted_by"]
    images = report["images"]["histogram"]
    mean_images = sum(k * v for k, v in images.items()) / sum(images.values())
    assert stub["tokens"]["mean"] - tokens["mean"] == pytest.approx(16 * mean_images, abs=0.1)
