"""Qwen25VLModule: Qwen2.5-VL in the shared Lightning loop."""

from __future__ import annotations

from torch import nn

from lmm.families.base import LMMModule
from lmm.families.qwen2_5_vl.model import Qwen25VLModel

IMAGE_PAD = "<|image_pad|>"


class Qwen25VLModule(LMMModule):
    """Trains and evaluates a `Qwen25VLModel`; parts are `vision`, `connector` (the patch
    merger) and `llm`."""

    def __init__(
        self, model: Qwen25VLModel, tokenizer: str, image_token: str = IMAGE_PAD, **kwargs
    ):
        """
        Args:
            model: the Qwen2.5-VL model.
            tokenizer: folder or hub id of the checkpoint's tokenizer.
            image_token: the feature slot token, for images and videos alike.
        """
        super().__init__(tokenizer=tokenizer, image_token=image_token, **kwargs)
        self.model = model
        model.llm.resize_vocab(len(self.tokenizer))
        self.setup_weights()
        self.train()  # from_pretrained leaves modules in eval mode

    def parts(self) -> dict[str, nn.Module]:
        return self.model.parts()
