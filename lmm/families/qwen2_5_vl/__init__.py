"""The Qwen2.5-VL family: window-attention ViT → 2 × 2 patch merger → Qwen2 decoder with M-RoPE."""

from lmm.families.qwen2_5_vl.media import Qwen25VLMediaSpec
from lmm.families.qwen2_5_vl.model import Qwen25VLModel
from lmm.families.qwen2_5_vl.module import Qwen25VLModule

__all__ = ["Qwen25VLMediaSpec", "Qwen25VLModel", "Qwen25VLModule"]
