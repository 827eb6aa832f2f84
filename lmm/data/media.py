"""Images: safe loading and the transform the vision tower expects (resize / pad / crop, normalize)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# Largest image accepted, in pixels: a small file that decodes to more is a decompression bomb.
MAX_IMAGE_PIXELS = 100_000_000


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open an image as RGB, decoding it fully now (so corrupt files fail here, not later).

    The size is checked from the header before decoding: more than `max_pixels` (default
    `MAX_IMAGE_PIXELS`) raises instead of allocating the decoded image.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with Image.open(path) as img:
        w, h = img.size
        if w * h > limit:
            raise ValueError(
                f"{w}x{h} = {w * h} pixels, more than the limit of {limit} "
                "(a decompression bomb?); resize it or raise lmm.data.media.MAX_IMAGE_PIXELS"
            )
        img.load()
        return img.convert("RGB")


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
