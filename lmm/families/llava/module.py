"""LlavaModule: the LLaVA family in the shared Lightning loop."""

from __future__ import annotations

from torch import nn

from lmm.families.base import LMMModule
from lmm.families.llava.model import LlavaModel


class LlavaModule(LMMModule):
    """Trains and evaluates a `LlavaModel`; parts are `vision`, `connector`, `llm` and, with
    anyres (OneVision), `newline` (the learned `image_newline`)."""

    def __init__(self, model: LlavaModel, tokenizer: str, **kwargs):
        """
        Args:
            model: the LLaVA model (vision tower, connector, LLM; OneVision's anyres layout).
            tokenizer: folder or hub id of the LLM's tokenizer.
        """
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.model = model
        model.llm.resize_vocab(len(self.tokenizer))
        self.setup_weights()
        self.train()  # from_pretrained leaves modules in eval mode

    def parts(self) -> dict[str, nn.Module]:
        parts = {
            "vision": self.model.vision,
            "connector": self.model.connector,
            "llm": self.model.llm,
        }
        if self.model.anyres is not None:
            parts["newline"] = self.model.anyres
        return parts
