"""Images: safe loading and the transform the vision tower expects (resize / pad / crop, normalize)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

# Largest image accepted, in pixels: a small file that decodes to more is a decompression bomb.
MAX_IMAGE_PIXELS = 100_000_000
# Longest side accepted, in pixels: padding to a square allocates side² pixels, so a 1x20000
# image of a hundred bytes would cost 20000² (the square root of MAX_IMAGE_PIXELS by default).
MAX_IMAGE_SIDE = 10_000
# Most bytes one image's decoding may take: the decoded image and its conversions to RGB.
MAX_DECODE_BYTES = 2 << 30
# Formats PIL may open an image as (JPEG includes multi-picture MPO). Others are refused:
# EPS runs Ghostscript, the rest are rare.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


class ImageError(ValueError):
    """An image file that cannot be decoded as asked (the message names the file and the fix)."""


class NotAnImageError(ImageError):
    """The file's content is not an image (whatever its suffix says)."""


class ImageTooLargeError(ImageError):
    """The header announces more pixels, a longer side or more decoded bytes than allowed."""


class ImageMemoryError(ImageError):
    """Decoding ran out of memory."""


class ImageModeError(ImageError):
    """A pixel format with no faithful 8-bit RGB reading (float outside [0, 1], negatives)."""


# (offset, magic bytes, what the file is, is it a video, its usual suffix)
_SIGNATURES: tuple[tuple[int, bytes, str, bool, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image", False, ".png"),
    (0, b"\xff\xd8\xff", "a JPEG image", False, ".jpg"),
    (0, b"GIF87a", "a GIF image", False, ".gif"),
    (0, b"GIF89a", "a GIF image", False, ".gif"),
    (0, b"II*\x00", "a TIFF image", False, ".tif"),
    (0, b"MM\x00*", "a TIFF image", False, ".tif"),
    (8, b"WEBP", "a WebP image", False, ".webp"),
    (0, b"BM", "a BMP image", False, ".bmp"),
    (4, b"ftyp", "an MP4/MOV video", True, ".mp4"),
    (8, b"AVI ", "an AVI video", True, ".avi"),
    (0, b"\x1a\x45\xdf\xa3", "a Matroska/WebM video", True, ".mkv"),
    (0, b"\x00\x00\x01\xba", "an MPEG-PS video", True, ".mpg"),
    (0, b"FLV", "an FLV video", True, ".flv"),
    (0, b"OggS", "an Ogg file", True, ".ogg"),
)


def sniff_bytes(head: bytes) -> tuple[str, bool, str] | None:
    """(what the content is, whether it is a video, its usual suffix) from its first 16
    bytes; None when unknown."""
    for offset, magic, name, video, suffix in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name, video, suffix
    return None


def sniff_media(path: str | Path) -> tuple[str, bool] | None:
    """(what the file is, whether it is a video) from its first bytes; None when unknown.

    GIF counts as an image here but a video reader may still read it as frames (TGIF-QA).
    """
    with open(path, "rb") as f:
        found = sniff_bytes(f.read(16))
    return found[:2] if found else None


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg")


def media_kind(path: str | Path) -> str:
    """`"video"` or `"image"`: by the file's first bytes (`sniff_media`), so a PNG named `.mp4`
    is an image; by its suffix only when the content is not known or the file is missing (the
    loader then names the problem)."""
    try:
        sniffed = sniff_media(path)
    except OSError:
        sniffed = None
    if sniffed is not None:
        return "video" if sniffed[1] else "image"
    return "video" if Path(path).suffix.lower() in VIDEO_SUFFIXES else "image"


def load_image(
    path: str | Path,
    max_pixels: int | None = None,
    max_side: int | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Open an image as 8-bit RGB, decoding it fully now (so corrupt files fail here, not later).

    The content decides, not the suffix: a video named `.png` raises `NotAnImageError`. The
    header is checked before anything is decoded: more than `max_pixels` pixels (default
    `MAX_IMAGE_PIXELS`), a side longer than `max_side` (`MAX_IMAGE_SIDE`) or a decoding that
    would take more than `max_bytes` (`MAX_DECODE_BYTES`) raise `ImageTooLargeError`; running
    out of memory while decoding raises `ImageMemoryError`. Every pixel format becomes RGB as
    `to_rgb` says. A missing file raises `FileNotFoundError`.
    """
    path = Path(path)
    pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    side = MAX_IMAGE_SIDE if max_side is None else max_side
    budget = MAX_DECODE_BYTES if max_bytes is None else max_bytes
    kind = sniff_media(path)
    if kind is not None and kind[1]:
        raise NotAnImageError(
            f"{path}: the file is {kind[0]}, not an image; "
            "give it as a video (the record's `video` field) or fix the file"
        )
    try:
        img = Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        what = f"{kind[0]} PIL cannot open" if kind else "not an image"
        raise NotAnImageError(
            f"{path}: {what} (formats read: {', '.join(IMAGE_FORMATS)}); "
            "convert it to PNG or JPEG, re-download it or drop the record"
        ) from e
    except Image.DecompressionBombError as e:  # PIL's own limit, hit before ours
        raise ImageTooLargeError(f"{path}: {e}; resize it or drop the record") from e
    with img:
        w, h = img.size
        if w * h > pixels:
            raise ImageTooLargeError(
                f"{path}: {w}x{h} = {w * h} pixels, more than the limit of {pixels} "
                "(a decompression bomb?); resize it or raise lmm.data.media.MAX_IMAGE_PIXELS"
            )
        if max(w, h) > side:
            raise ImageTooLargeError(
                f"{path}: {w}x{h}, a side longer than the limit of {side} pixels (padding it "
                f"to a square would take {max(w, h) ** 2} pixels); crop or resize it, or raise "
                "lmm.data.media.MAX_IMAGE_SIDE"
            )
        need = decode_bytes(img.mode, w, h)
        if need > budget:
            raise ImageTooLargeError(
                f"{path}: {w}x{h} in mode {img.mode} takes {need} bytes to decode, more than "
                f"the limit of {budget}; resize it or raise lmm.data.media.MAX_DECODE_BYTES"
            )
        try:
            img.load()
            return to_rgb(img, path)
        except MemoryError as e:
            raise ImageMemoryError(
                f"{path}: out of memory decoding {w}x{h} in mode {img.mode} ({need} bytes "
                "expected); resize it, lower lmm.data.media.MAX_DECODE_BYTES or use fewer workers"
            ) from e


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Bytes decoding a `mode` image of `width` x `height` may hold at once, RGB result included.

    The decoded pixels, an RGBA copy (alpha compositing) or a float64 copy (high bit depths),
    and the RGB result.
    """
    base = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3}
    per_pixel = base.get(mode, 4)  # RGBA, CMYK, I, F, I;16 (2, counted as 4)
    extra = 8 if mode in _HIGH_DEPTH else 4
    return width * height * (per_pixel + extra + 3)


_HIGH_DEPTH = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """8-bit RGB of any PIL mode, by what the pixels mean, not by clipping.

    - 16-bit and 32-bit integer grey (`I;16*`, `I`): scaled by the bit depth, `v * 255 / max`
      rounded (a 16-bit 30583 is 119, not 255 as PIL's clipping `convert` gives). The depth is
      16 for PNG (its only depth above 8), TIFF's BitsPerSample (signed: one bit less), and
      otherwise 16 when every value fits, else refused.
    - float grey (`F`, float TIFF): values in [0, 1] times 255, rounded; NaN or a value outside
      [0, 1] raises `ImageModeError` (no range to guess).
    - transparency (`LA`, `RGBA`, `PA`, `La`, `RGBa`, palette or grey with a transparent
      colour): composited on white, as transformers' `convert_to_rgb` does
      (transformers 5.24 `image_transforms.py`), not dropped to reveal what lies under it.
    - `CMYK`: `(255 - c) * (255 - k) / 255` per channel, rounded (the same in every Pillow).
    - `1`, `L`, `P`, `RGBX`, `YCbCr`: PIL's `convert("RGB")` (`1` is 0 or 255).
    """
    mode = img.mode
    if mode in _HIGH_DEPTH:
        return Image.fromarray(_grey8(img, path), "L").convert("RGB")
    if "A" in img.getbands() or "a" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode == "CMYK":
        cmyk = np.asarray(img).astype(np.uint32)
        k = 255 - cmyk[..., 3:]
        rgb = ((255 - cmyk[..., :3]) * k + 127) // 255  # rounded: no ties (255 is odd)
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode in ("1", "L", "P", "RGBX", "YCbCr"):
        return img.convert("RGB")
    raise ImageModeError(
        f"{path}: pixel mode {mode!r} has no known RGB reading; convert it to 8-bit RGB"
    )


def _grey8(img: Image.Image, path: str | Path) -> np.ndarray:
    """`[H, W]` uint8 of a high-depth grey image (see `to_rgb`)."""
    x = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
            raise ImageModeError(
                f"{path}: a float image with values in [{lo}, {hi}], outside [0, 1], so its "
                "8-bit reading is unknown; save it as 8- or 16-bit integers"
            )
        return np.round(x.astype(np.float64) * 255).astype(np.uint8)
    x = x.astype(np.int64)
    if x.size and int(x.min()) < 0:
        raise ImageModeError(
            f"{path}: a {img.mode} image with negative values ({int(x.min())}); "
            "save it as unsigned 8- or 16-bit integers"
        )
    top = (1 << _bit_depth(img, x, path)) - 1
    return ((x * 255 + top // 2) // top).astype(np.uint8)  # round(v * 255 / top): no ties


def _bit_depth(img: Image.Image, x: np.ndarray, path: str | Path) -> int:
    """Bits of the samples of an integer grey image (`I`, `I;16*`)."""
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        bits = tags.get(258, (16,))
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        signed = tags.get(339, (1,))
        signed = int(signed[0] if isinstance(signed, tuple) else signed) == 2
        return bits - 1 if signed else bits
    if img.format == "PNG" or img.mode.startswith("I;16"):
        return 16
    if not x.size or int(x.max()) <= 0xFFFF:
        return 16
    raise ImageModeError(
        f"{path}: a 32-bit {img.format or ''} image whose bit depth the file does not say; "
        "save it as 8- or 16-bit PNG"
    )


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side with `fill`, centring the image (LLaVA's `expand2square`)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def fit_and_pad(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect to fit (height, width), centred on black (LLaVA-NeXT anyres).

    The fitted side is rounded up, as LLaVA-NeXT's `resize_and_pad_image` and transformers'
    `get_patch_output_size` do.
    """
    h, w = size
    scale_w, scale_h = w / img.width, h / img.height
    if scale_w < scale_h:
        new_w, new_h = w, min(math.ceil(img.height * scale_w), h)
    else:
        new_w, new_h = min(math.ceil(img.width * scale_h), w), h
    out = Image.new(img.mode, (w, h), (0, 0, 0))
    out.paste(img.resize((new_w, new_h), Image.BICUBIC), ((w - new_w) // 2, (h - new_h) // 2))
    return out


def split_tiles(img: Image.Image, tile: int) -> list[Image.Image]:
    """Square `tile`-pixel crops of an image whose sides are multiples of `tile`, row by row."""
    return [
        img.crop((x, y, x + tile, y + tile))
        for y in range(0, img.height, tile)
        for x in range(0, img.width, tile)
    ]


@dataclass(frozen=True)
class ImageTransform:
    """PIL image → `[3, size, size]` float tensor, as the vision tower was trained.

    aspect: `pad` expands to a square with the mean colour then resizes (LLaVA `pad`);
    `resize` squashes to a square; `crop` resizes the short side and centre-crops (CLIP).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: Literal["pad", "resize", "crop"] = "pad"

    def __call__(self, img: Image.Image) -> Tensor:
        if self.aspect == "pad":
            # LLaVA's expand2square fills with tuple(int(x * 255) for x in image_mean):
            # truncated, not rounded (122, 116, 104 for CLIP; 127 for SigLIP)
            fill = tuple(int(m * 255) for m in self.mean)
            img = expand_to_square(img, fill).resize((self.size, self.size), Image.BICUBIC)
        elif self.aspect == "resize":
            img = img.resize((self.size, self.size), Image.BICUBIC)
        elif self.aspect == "crop":
            img = img.resize(shortest_edge_size(img.width, img.height, self.size), Image.BICUBIC)
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        else:
            raise ValueError(f"aspect must be pad, resize or crop, got {self.aspect!r}")
        return normalize(img, self.mean, self.std)  # [3, size, size]


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side `size` and the long side `int(size * long / short)`.

    Truncated, not rounded: transformers' `get_resize_output_image_size` (CLIPImageProcessor,
    and so LLaVA's and Mantis-CLIP's preprocessing) computes the long side this way.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def normalize(img: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """`[3, H, W]` float32: `(x / 255 - mean) / std` in the arithmetic of transformers' processors.

    Rescaling in float64 then casting, and normalizing in float32, gives the bits of
    `CLIPImageProcessor` / `SiglipImageProcessor`, so pixels equal theirs exactly.
    """
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
