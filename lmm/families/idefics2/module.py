"""Idefics2Module: the Idefics2 family (Mantis-Idefics2, VideoScore's base) in the shared Lightning loop."""

from __future__ import annotations

from torch import nn

from lmm.families.base import LMMModule
from lmm.families.idefics2.model import FAKE_IMAGE_TOKEN, Idefics2MediaSpec, Idefics2Model


class Idefics2Module(LMMModule):
    """Trains and evaluates an `Idefics2Model`; parts are `vision`, `connector` and `llm`."""

    def __init__(
        self,
        model: Idefics2Model,
        tokenizer: str,
        fake_image_token: str = FAKE_IMAGE_TOKEN,
        **kwargs,
    ):
        """
        Args:
            model: the Idefics2 model (vision tower, perceiver connector, LLM).
            tokenizer: folder or hub id of the checkpoint's tokenizer.
            fake_image_token: the token written around every image view; added to the
                tokenizer (as a special token, with a new embedding row) if it lacks it.
        """
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.fake_image_token = fake_image_token
        if fake_image_token not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens(
                {"additional_special_tokens": [fake_image_token]},
                replace_extra_special_tokens=False,
            )
        self.model = model
        model.llm.resize_vocab(len(self.tokenizer))
        self.setup_weights()
        self.train()  # from_pretrained leaves modules in eval mode

    def parts(self) -> dict[str, nn.Module]:
        return {
            "vision": self.model.vision,
            "connector": self.model.connector,
            "llm": self.model.llm,
        }

    def media_spec(self) -> Idefics2MediaSpec:
        return self.model.media_spec(self.fake_image_token)
