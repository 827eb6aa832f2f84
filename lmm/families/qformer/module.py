"""QFormerModule: the Q-Former family (BLIP-2, Cheetah's VPG-C) in the shared Lightning loop."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from lmm.data.batch import Batch
from lmm.families.base import LMMModule
from lmm.families.qformer.model import QFormerModel, VPGCContext
from lmm.generation.decode import Step

# What Cheetah trains: VPG-C only. Without VPG-C, BLIP-2's stage 2: Q-Former and projection.
FROZEN_WITH_VPGC = ["vision", "qformer", "connector", "llm"]
FROZEN_WITHOUT_VPGC = ["vision", "llm"]


class QFormerModule(LMMModule):
    """Trains and evaluates a `QFormerModel`; parts: vision, qformer, connector, llm (+ vpgc)."""

    def __init__(
        self, model: QFormerModel, tokenizer: str, freeze: list[str] | None = None, **kwargs
    ):
        """
        Args:
            model: the Q-Former model (vision tower, Q-Former, projection, LLM, VPG-C).
            tokenizer: folder or hub id of the LLM's tokenizer.
            freeze: parts whose parameters are not trained; None: everything but `vpgc`
                (Cheetah), or without VPG-C, `vision` and `llm` (BLIP-2 stage 2); [] trains all.
        """
        if freeze is None:
            freeze = FROZEN_WITH_VPGC if model.vpgc is not None else FROZEN_WITHOUT_VPGC
        super().__init__(tokenizer=tokenizer, freeze=list(freeze), **kwargs)
        self.model = model
        model.llm.resize_vocab(len(self.tokenizer))
        self._prompts: list[tuple[Tensor, VPGCContext]] | None = None
        self.setup_weights()
        self.train()  # from_pretrained leaves modules in eval mode

    def parts(self) -> dict[str, nn.Module]:
        parts = {
            "vision": self.model.vision,
            "qformer": self.model.qformer,
            "connector": self.model.connector,
            "llm": self.model.llm,
        }
        if self.model.vpgc is not None:
            parts["vpgc"] = self.model.vpgc
        return parts

    def embed(self, batch: Batch) -> Tensor:
        embeds, context = self.model.prepare(batch, self.image_token_id)
        if self._prompts is not None and context is not None:
            self._prompts.append((embeds, context))  # a generation prompt batch
        return embeds

    def generation_stream(self, batch: Batch, *args, **kwargs) -> Iterator[Step]:
        """Decoding steps (see `LMMModule.generation_stream`), with VPG-C at each prompt's prefill."""
        if self.model.vpgc is None:
            return super().generation_stream(batch, *args, **kwargs)
        self._prompts = []  # `embed` records each row's prompt and VPG-C context
        try:
            steps = super().generation_stream(batch, *args, **kwargs)
            prompts = self._prompts
        finally:
            self._prompts = None
        return self._with_prompts(prompts, steps)

    def _with_prompts(self, prompts: list, steps: Iterator[Step]) -> Iterator[Step]:
        with self.model.prompts(prompts):
            yield from steps
