"""The LLaVA family: vision tower → connector → causal LM (Mantis-CLIP/SigLIP, Mipha, LLaVA-Phi)."""

from lmm.families.llava.model import LlavaModel
from lmm.families.registry import TOKENIZER, Family, Layout

FAMILY = Family(
    "llava",
    model="lmm.families.llava.LlavaModel",
    layouts=(
        Layout(
            "mantis",
            "Mantis (transformers Llava layout, CLIP/SigLIP + Llama-3)",
            "lmm.data.templates.Llama3 (Mantis-8B-*-llama3)",
        ),
        Layout(
            "llava_qwen",
            "LLaVA-NeXT / OneVision as MAmmoTH-VL publishes it",
            "lmm.data.templates.Qwen25 (MAmmoTH-VL)",
            {"tokenizer": TOKENIZER, "vision_config": "the vision tower's folder/config.json"},
        ),
        Layout(
            "mipha",
            "Mipha / LLaVA-Phi",
            "lmm.data.templates.Phi (Mipha-Phi) or lmm.data.templates.Gemma (Mipha-Gemma)",
        ),
    ),
    exports_to="LlavaForConditionalGeneration",
)

__all__ = ["FAMILY", "LlavaModel"]
