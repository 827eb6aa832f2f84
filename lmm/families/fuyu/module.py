"""FuyuModule: the Fuyu family (Fuyu-8B, Mantis-8B-Fuyu) in the shared Lightning loop."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedTokenizerBase

from lmm.families.base import LMMModule
from lmm.families.fuyu.model import IMAGE_TOKEN, FuyuModel
from lmm.training.strategies import apply_fsdp2
from lmm.utils.logging import get_logger

log = get_logger(__name__)


def add_media_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[str]:
    """Make each token one special token: new ones are appended, known ones keep their id.

    Fuyu's own tokenizer has `|SPEAKER|` and `|NEWLINE|` as ordinary pieces (a SentencePiece
    prefix `▁` may come before them); as special tokens they are never split or prefixed. Mantis
    adds `|IMAGE|` and `|ENDOFIMAGE|`. Returns the tokens that were not in the vocabulary.
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    unsplit = [
        t
        for t in dict.fromkeys(tokens)
        if t in vocab and len(tokenizer(t, add_special_tokens=False).input_ids) != 1
    ]
    if new or unsplit:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": new + unsplit}, replace_extra_special_tokens=False
        )
    if new:
        log.info("added %s to the tokenizer (the LLM's embeddings grow)", new)
    return new


class FuyuModule(LMMModule):
    """Trains and evaluates a `FuyuModel`; parts are `vision` (the patch embedding) and `llm`."""

    def __init__(self, model: FuyuModel, tokenizer: str, image_token: str = IMAGE_TOKEN, **kwargs):
        """
        Args:
            model: the Fuyu model (patch embedding, Persimmon LM).
            tokenizer: folder or hub id of the LLM's tokenizer; the image token, `|NEWLINE|` and
                the model's prefix/suffix tokens are added as special tokens if missing.
            image_token: the placeholder each patch embedding replaces (Fuyu: `|SPEAKER|`).
        """
        super().__init__(tokenizer=tokenizer, image_token=image_token, **kwargs)
        self.model = model
        add_media_tokens(self.tokenizer, [image_token, *model.media_tokens()])
        model.llm.resize_vocab(len(self.tokenizer))
        self.setup_weights()
        self.train()  # from_pretrained leaves modules in eval mode

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.model.vision, "llm": self.model.llm}

    def shard(self, mesh: DeviceMesh) -> None:
        """The FSDP2 plan: decoder layers, then the root. The patch embedding is one linear
        layer with no layer stack of its own: it is sharded with the root (embeddings,
        lm_head), not as a vision unit."""
        apply_fsdp2(self.root_module(), None, self.llm, mesh, self.fsdp)
