"""The media spec the bad-input tests share: 4 tokens per 8-px image (their `processor`
fixture is in tests/data/conftest.py)."""

from __future__ import annotations

from lmm.data.media import ImageTransform
from lmm.data.processor import MediaSpec


class TinySpec(MediaSpec):
    transform = ImageTransform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")

    def num_image_tokens(self, image_size):
        return 4
