"""Qwen2.5-VL's media: `smart_resize`d images and frames as 14-px patch rows, and their tokens.

An image (or a video frame) is resized so that both sides are multiples of patch × merge
(28 px) with its pixel count within [min_pixels, max_pixels], normalised, and cut into
`[gh·gw, 3, 14, 14]` patches in the order transformers' Qwen2-VL image processor writes them
(2 × 2 merge windows row by row, each window's patches row by row). The model pairs a video's
frames on the temporal axis (and repeats an image's patch on it) when it rebuilds the
`[patches, 3·2·14·14]` rows the vision tower reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from lmm.data.media import normalize
from lmm.data.processor import MediaMode, MediaSpec

# transformers' Qwen2VLImageProcessor / Qwen2VLVideoProcessor defaults (OpenAI CLIP statistics)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class Qwen25VLMediaSpec(MediaSpec):
    """Patch rows and token counts of Qwen2.5-VL's media, as plain numbers.

    A marker becomes `<|vision_start|>`, one feature slot per merged 2 × 2 patch window (per
    pair of frames for a video), `<|vision_end|>`. A video with an odd frame count is padded
    with its last frame, as transformers' `Qwen2VLVideoProcessor.patchify` does.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    vision_start: str = VISION_START
    vision_end: str = VISION_END
    size_dependent = True  # the grid follows the original size

    def resized(self, image_size: tuple[int, int], mode: MediaMode) -> tuple[int, int]:
        """(height, width) in pixels an image (or a frame) of `image_size` is resized to."""
        video = mode == "video"
        return smart_resize(
            *image_size,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.video_min_pixels if video else self.min_pixels,
            max_pixels=self.video_max_pixels if video else self.max_pixels,
        )

    def grid(self, image_size: tuple[int, int], mode: MediaMode) -> tuple[int, int]:
        """(rows, columns) of 14-px patches of one image or frame."""
        h, w = self.resized(image_size, mode)
        return h // self.patch_size, w // self.patch_size

    def temporal_grid(self, frames: int) -> int:
        """Temporal patches of `frames` frames (an odd count padded with the last frame)."""
        return math.ceil(frames / self.temporal_patch_size)

    def num_tokens(self, image_size: tuple[int, int], mode: MediaMode, frames: int = 1) -> int:
        """Feature slots of an image, or of a video of `frames` frames."""
        gh, gw = self.grid(image_size, mode)
        t = self.temporal_grid(frames) if mode == "video" else 1
        return t * gh * gw // self.merge_size**2

    def marker_tokens(
        self, image_size: tuple[int, int], mode: MediaMode, frames: int = 1
    ) -> list[str | None]:
        n = self.num_tokens(image_size, mode, frames)
        return [self.vision_start, *[None] * n, self.vision_end]

    def views(self, image: Image.Image, mode: MediaMode) -> Tensor:  # -> [gh·gw, 3, P, P]
        h, w = self.resized((image.height, image.width), mode)
        pixels = normalize(image.resize((w, h), Image.BICUBIC), self.mean, self.std)
        return patchify(pixels, self.patch_size, self.merge_size)


def patchify(pixels: Tensor, patch: int, merge: int) -> Tensor:  # [3, H, W] -> [gh·gw, 3, P, P]
    """Patches in the processor's order: merge windows row by row, their patches row by row."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    return x.reshape(gh * gw, c, patch, patch)


def temporal_rows(patches: Tensor, frames: int, temporal: int) -> Tensor:
    """One media item's `[frames·n, 3, P, P]` patches → `[t·n, 3·T·P·P]` vision tower rows.

    Frame `k·T + j` is temporal slot `j` of row block `k`; a still image (`frames` 1) fills
    every slot with itself, an odd video repeats its last frame (transformers' processors).
    """
    n = patches.shape[0] // frames
    x = patches.reshape(frames, n, *patches.shape[1:])  # [F, n, C, P, P]
    pad = -frames % temporal
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
    t = x.shape[0] // temporal
    x = x.reshape(t, temporal, n, *x.shape[2:]).permute(0, 2, 3, 1, 4, 5)  # [t, n, C, T, P, P]
    return x.reshape(t * n, -1)
