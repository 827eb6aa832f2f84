"""Pixels equal the processors the seeds used: CLIP crop, SigLIP resize, LLaVA's expand-to-square pad."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from lmm.data.media import ImageTransform, expand_to_square, shortest_edge_size

# (width, height): odd, prime, very wide and very tall sizes, where rounding the long side
# (lmm's old `round(w * S / short)`) and truncating it (transformers) disagree.
SIZES = [
    (37, 23),
    (23, 37),
    (101, 67),
    (67, 101),
    (333, 500),
    (500, 333),
    (641, 427),
    (427, 641),
    (17, 301),
    (301, 17),
    (999, 998),
    (998, 999),
    (45, 44),
    (224, 225),
    (337, 335),
    (1001, 3),
    (3, 1001),
    (640, 481),
    (481, 640),
    (12, 12),
]
CLIP_SIZE = 336
SIGLIP_SIZE = 384


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _clip() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": CLIP_SIZE},
        crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def _hf(processor, image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(processor(image, return_tensors="np")["pixel_values"][0]))


def test_crop_matches_clip_processor():
    """`crop` = CLIPImageProcessor, `pad` = LLaVA's expand2square + CLIPImageProcessor, `resize` =
    SiglipImageProcessor: bit for bit on 20 odd sizes."""
    clip = _clip()
    siglip = SiglipImageProcessorPil(
        size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    crop = ImageTransform(CLIP_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "crop")
    pad = ImageTransform(CLIP_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pad")
    resize = ImageTransform(SIGLIP_SIZE, (0.5,) * 3, (0.5,) * 3, "resize")
    fill = tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)  # llava/train/train.py, expand2square call
    for k, (w, h) in enumerate(SIZES):
        image = _noise(w, h, k)
        assert torch.equal(crop(image), _hf(clip, image)), f"crop differs at {w}x{h}"
        assert torch.equal(pad(image), _hf(clip, expand_to_square(image, fill))), f"pad at {w}x{h}"
        assert torch.equal(resize(image), _hf(siglip, image)), f"resize differs at {w}x{h}"


@pytest.mark.parametrize(
    ("width", "height", "expected"), [(500, 333, (504, 336)), (333, 500, (336, 504))]
)
def test_shortest_edge_truncates(width, height, expected):
    """336 * 500 / 333 = 504.5: transformers truncates to 504 (rounding gave 505)."""
    assert shortest_edge_size(width, height, 336) == expected
