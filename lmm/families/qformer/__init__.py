"""The Q-Former family: BLIP-2 vision tower → Q-Former → projection → causal LM, with VPG-C (Cheetah)."""

from lmm.families.qformer.model import VPGC, QFormerMediaSpec, QFormerModel, VPGCContext
from lmm.families.registry import TOKENIZER, Family, Layout

FAMILY = Family(
    "qformer",
    model="lmm.families.qformer.QFormerModel",
    layouts=(
        Layout(
            "cheetah",
            "Cheetah's LAVIS .pth files (+ BLIP-2, EVA and a frozen LLM)",
            "lmm.data.templates.CheetahVicuna or CheetahLlama2",
            {
                "tokenizer": TOKENIZER,
                "llm": "the frozen LLM's folder (Vicuna / LLaMA-2)",
                "blip2": "the BLIP-2 .pth (Q-Former, vision)",
                "eva": "the EVA ViT .pth",
                "template": "the prompt: vicuna or llama2",
                "update_layer": "VPG-C's decoder layer",
            },
        ),
    ),
)

__all__ = ["FAMILY", "VPGC", "QFormerMediaSpec", "QFormerModel", "VPGCContext"]
