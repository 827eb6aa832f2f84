"""The Qwen2.5-VL family: window-attention ViT → 2 × 2 patch merger → Qwen2 decoder with M-RoPE."""

from lmm.families.qwen2_5_vl.media import Qwen25VLMediaSpec
from lmm.families.qwen2_5_vl.model import Qwen25VLModel
from lmm.families.registry import Family, Layout

FAMILY = Family(
    "qwen2_5_vl",
    model="lmm.families.qwen2_5_vl.Qwen25VLModel",
    layouts=(
        Layout(
            "qwen2_5_vl",
            "transformers Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, both key layouts)",
            "lmm.data.templates.ChatML (Qwen2.5-VL's system prompt)",
            transformers=("Qwen2_5_VLForConditionalGeneration",),
        ),
    ),
    exports_to=("Qwen2_5_VLForConditionalGeneration",),
)

__all__ = ["FAMILY", "Qwen25VLMediaSpec", "Qwen25VLModel"]
