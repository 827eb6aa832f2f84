"""Bad and unusual media, one test per case: exact 8-bit RGB for every PIL mode, content over
suffix, size budgets checked from the header, a memory cap, symlinks out of the data root.

Each bad case is a `BadRecordError` naming file and record, whose cause is the named error,
and a skip that `TrainStream(on_bad_record="skip")` counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lmm.data import media
from lmm.data.formats import iter_samples, load_samples, read_records
from lmm.data.media import (
    ImageMemoryError,
    ImageModeError,
    ImageTooLargeError,
    NotAnImageError,
    load_image,
)
from lmm.data.sample import BadRecordError
from lmm.data.stream import TrainStream
from lmm.data.video import VideoError, VideoReader
from tests.data.test_video import write_video


def _rgb(path: Path) -> np.ndarray:
    """`[H, W, 3]` uint8 as lmm decodes the file."""
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def _chat(rid: str, **media_fields) -> dict:
    user = "<video>\nWhat?" if "video" in media_fields else "<image>\nWhat?"
    conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": "x"}]
    return {"id": rid, "conversation": conversation, **media_fields}


def _bad_record(tmp_path: Path, processor, record: dict, cause: type, match: str) -> None:
    """The record is a BadRecordError naming file and record, caused by `cause`, and a counted
    skip next to a good record."""
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "good.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record]))
    [sample] = load_samples(path)
    with pytest.raises(BadRecordError, match=match) as err:
        processor(sample)
    assert str(path) in str(err.value) and repr(record["id"]) in str(err.value), str(err.value)
    assert isinstance(err.value.__cause__, cause), repr(err.value.__cause__)
    _counted_skip(tmp_path, processor, record)


def _counted_skip(tmp_path: Path, processor, record: dict) -> None:
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([_chat("good", image="good.png"), record]))

    def source(epoch):
        return iter_samples(read_records(path), source=path)

    batches = list(TrainStream(source, processor, batch_size=2, on_bad_record="skip"))
    assert [b.ids for b in batches] == [["good"]]
    assert sum(b.skipped for b in batches) == 1


# every PIL mode decodes to the 8-bit values its pixels mean ----------------------------------


def test_16bit_png_scaled_by_bit_depth(tmp_path):
    values = np.array([[0, 1000, 30583, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    # round(v * 255 / 65535); PIL's convert("RGB") clips and gives [0, 255, 255, 255]
    assert _rgb(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 4, 119, 255]
    # the case: a mid-grey 16-bit image is mid-grey, not almost all white
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert abs(float(_rgb(tmp_path / "ramp.png").mean()) - 127.5) < 0.6


def test_mode_I_uses_the_file_bit_depth(tmp_path):
    # 16-bit PGM opens as "I": 16 bits
    (tmp_path / "g.ppm").write_bytes(b"P5 2 1 65535\n\x80\x00\xff\xff")
    assert Image.open(tmp_path / "g.ppm").mode == "I"
    assert _rgb(tmp_path / "g.ppm")[0, :, 0].tolist() == [128, 255]
    # signed 32-bit TIFF: 31 bits of value
    values = np.array([[0, 1 << 30, (1 << 31) - 1]], dtype=np.int32)
    Image.fromarray(values, "I").save(tmp_path / "i32.tif")
    assert _rgb(tmp_path / "i32.tif")[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[-5, 7]], dtype=np.int32), "I").save(tmp_path / "neg.tif")
    with pytest.raises(ImageModeError, match="negative values"):
        load_image(tmp_path / "neg.tif")


def test_float_tiff_in_unit_range(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert _rgb(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 64, 128, 255]
    for name, bad in (("big", [0.0, 200.0]), ("nan", [0.0, float("nan")])):
        Image.fromarray(np.array([bad], dtype=np.float32), "F").save(tmp_path / f"{name}.tif")
        with pytest.raises(ImageModeError, match=r"outside \[0, 1\]"):
            load_image(tmp_path / f"{name}.tif")


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255])
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png")
    assert _rgb(tmp_path / "p.png")[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    img.save(tmp_path / "pt.png", transparency=0)  # red is transparent: white, not red
    assert Image.open(tmp_path / "pt.png").mode == "P"
    assert _rgb(tmp_path / "pt.png")[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_alpha_composited_on_white(tmp_path):
    la = Image.new("LA", (3, 1))
    for x, px in enumerate([(50, 0), (50, 255), (0, 128)]):
        la.putpixel((x, 0), px)
    la.save(tmp_path / "la.png")
    grey = _rgb(tmp_path / "la.png")[0, :, 0].tolist()
    assert grey[:2] == [255, 50] and abs(grey[2] - 127) <= 1  # 255 * (1 - 128/255)
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    assert _rgb(tmp_path / "rgba.png")[0].tolist() == [[10, 20, 30], [255, 255, 255]]


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (100, 0, 255, 100))
    img.putpixel((1, 0), (0, 0, 0, 0))
    img.save(tmp_path / "cmyk.tif")
    # (255 - c) * (255 - k) / 255: 155 * 155 / 255 = 94.2
    assert _rgb(tmp_path / "cmyk.tif")[0].tolist() == [[94, 155, 0], [255, 255, 255]]


def test_grey_and_bilevel(tmp_path):
    Image.new("L", (1, 1), 7).save(tmp_path / "l.png")
    assert _rgb(tmp_path / "l.png").tolist() == [[[7, 7, 7]]]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert _rgb(tmp_path / "b.png")[0, :, 0].tolist() == [0, 255]


# content, not suffix ----------------------------------------------------------------------


def test_png_named_mp4_is_not_a_video(tmp_path, processor):
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "still.mp4", format="PNG")
    record = _chat("png-as-mp4", video="still.mp4")
    _bad_record(tmp_path, processor, record, VideoError, "is a PNG image, not a video")


def test_pyav_refuses_still_image_demuxers(tmp_path, monkeypatch):
    # the backstop behind the magic-byte check: FFmpeg's image2 / *_pipe demuxers
    Image.new("RGB", (16, 16)).save(tmp_path / "still.mp4", format="PNG")
    monkeypatch.setattr("lmm.data.video._refuse_images", lambda path: None)
    with pytest.raises(VideoError, match="still image"):
        VideoReader("pyav").info(tmp_path / "still.mp4")


def test_mp4_named_png_is_not_an_image(tmp_path, processor):
    write_video(tmp_path / "clip.mp4", n=3).rename(tmp_path / "clip.png")
    record = _chat("mp4-as-png", image="clip.png")
    _bad_record(tmp_path, processor, record, NotAnImageError, "is an MP4/MOV video, not an image")


# budgets from the header, before any allocation ----------------------------------------------


@pytest.mark.parametrize("side", [20_000, 45_000])
def test_long_thin_png_refused_before_decoding(tmp_path, processor, monkeypatch, side):
    Image.new("L", (1, side)).save(tmp_path / "thin.png", optimize=True)
    assert (tmp_path / "thin.png").stat().st_size < 1000

    def no_decoding(self):
        raise AssertionError("decoded a refused image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    record = _chat("thin", image="thin.png")
    with pytest.raises(ImageTooLargeError, match=f"1x{side}, a side longer than the limit"):
        load_image(tmp_path / "thin.png")
    monkeypatch.undo()  # the good image of the skip check decodes
    _bad_record(tmp_path, processor, record, ImageTooLargeError, "a side longer than the limit")


def test_decode_bytes_cap(tmp_path, processor, monkeypatch):
    Image.new("RGBA", (16, 16)).save(tmp_path / "a.png")
    monkeypatch.setattr(media, "MAX_DECODE_BYTES", 16 * 16 * 4)
    record = _chat("cap", image="a.png")
    _bad_record(tmp_path, processor, record, ImageTooLargeError, "bytes to decode, more than")


def test_out_of_memory_while_decoding_is_a_bad_record(tmp_path, processor, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "oom.png")
    real_load = ImageFile.ImageFile.load

    def load(self):
        if self.filename and self.filename.endswith("oom.png"):
            raise MemoryError
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    record = _chat("oom", image="oom.png")
    _bad_record(tmp_path, processor, record, ImageMemoryError, "out of memory decoding")


# symlinks ---------------------------------------------------------------------------------


def test_symlink_out_of_the_data_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    Image.new("RGB", (4, 4)).save(root / "inside.png")
    (root / "leak.png").symlink_to(outside / "secret.png")
    (root / "alias.png").symlink_to(root / "inside.png")
    (root / "dir").symlink_to(outside, target_is_directory=True)
    path = root / "train.json"
    for rel in ("leak.png", "dir/secret.png"):
        path.write_text(json.dumps([_chat("link", image=rel)]))
        with pytest.raises(BadRecordError, match="is a symlink to .*outside the data root") as e:
            load_samples(path)
        assert str(path) in str(e.value) and "'link'" in str(e.value)
        [sample] = load_samples(path, allow_outside_root=True)
        assert sample.images == [root / rel]
    path.write_text(json.dumps([_chat("alias", image="alias.png")]))
    assert load_samples(path)[0].images == [root / "alias.png"]  # a link within the root


def test_symlink_out_of_the_root_is_a_counted_skip(tmp_path, processor):
    (tmp_path / "out").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "out" / "secret.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "leak.png").symlink_to(tmp_path / "out" / "secret.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "good.png")
    _counted_skip(root, processor, _chat("link", image="leak.png"))
