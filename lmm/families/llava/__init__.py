"""The LLaVA family: vision tower → connector → causal LM (Mantis-CLIP/SigLIP, Mipha, LLaVA-Phi)."""

from lmm.families.llava.model import LlavaModel
from lmm.families.llava.module import LlavaModule

__all__ = ["LlavaModel", "LlavaModule"]
