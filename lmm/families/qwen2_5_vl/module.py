"""Qwen25VLModule: Qwen2.5-VL in the shared Lightning loop."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lmm.data.batch import Batch
from lmm.families.base import LMMModule
from lmm.families.qwen2_5_vl.model import Qwen25VLModel
from lmm.generation.decode import Step

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

    def generation_stream(self, batch: Batch, *args, **kwargs) -> Iterator[Step]:
        """Not yet: the shared generator decodes on 1-D positions counted from the attention
        mask, which puts every token after an image at the wrong M-RoPE position. The family
        contract's `Prefill` (embeddings + `[3, B, L]` positions, decoding from the last + 1)
        fixes it; `Qwen25VLModel.prefill` already returns both (CORE_NEEDS.md)."""
        raise NotImplementedError(
            "Qwen2.5-VL generation needs the generator to take M-RoPE prompt positions "
            "(lmm.generation.decode.Prefill, the family contract); until it lands, decode from "
            "Qwen25VLModel.prefill(batch, image_token_id) yourself"
        )
