"""The LLaVA family: vision tower → connector → causal LM (Mantis-CLIP/SigLIP, Mipha, LLaVA-Phi),
and with anyres LLaVA-OneVision (MAmmoTH-VL)."""

from lmm.families.llava.model import LlavaModel
from lmm.families.registry import TOKENIZER, Family, Layout

# The prompt formats of llava-hf's chat templates, for folders without one lmm recognises:
# LLaVA-1.5 `USER: <image>\n{q} ASSISTANT:`, OneVision ChatML with no system prompt.
LLAVA_HF = {"class_path": "lmm.data.templates.VicunaV1", "init_args": {"system": ""}}
ONEVISION_HF = {"class_path": "lmm.data.templates.ChatML", "init_args": {"system": ""}}

FAMILY = Family(
    "llava",
    model="lmm.families.llava.LlavaModel",
    layouts=(
        Layout(
            "mantis",
            "Mantis (transformers Llava layout, CLIP/SigLIP + Llama-3)",
            "lmm.data.templates.Llama3 (Mantis-8B-*-llama3)",
            transformers=("LlavaForConditionalGeneration",),
            default_template=LLAVA_HF,
        ),
        Layout(
            "onevision",
            "transformers LLaVA-OneVision (llava-hf/llava-onevision-*-hf)",
            "lmm.data.templates.ChatML with system: '' (llava-hf's OneVision template)",
            transformers=("LlavaOnevisionForConditionalGeneration",),
            default_template=ONEVISION_HF,
        ),
        Layout(
            "llava_qwen",
            "LLaVA-NeXT / OneVision as MAmmoTH-VL publishes it",
            "lmm.data.templates.Qwen25 (MAmmoTH-VL)",
            {"tokenizer": TOKENIZER, "vision_config": "the vision tower's folder/config.json"},
            default_template="lmm.data.templates.Qwen25",
        ),
        Layout(
            "mipha",
            "Mipha / LLaVA-Phi",
            "lmm.data.templates.Phi (Mipha-Phi) or lmm.data.templates.Gemma (Mipha-Gemma)",
        ),
    ),
    exports_to=("LlavaForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"),
)

__all__ = ["FAMILY", "LlavaModel"]
