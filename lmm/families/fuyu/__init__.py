"""The Fuyu family: image patches linearly embedded into a Persimmon LM (Fuyu-8B, Mantis-8B-Fuyu)."""

from lmm.families.fuyu.model import FuyuImageTransform, FuyuMediaSpec, FuyuModel
from lmm.families.fuyu.module import FuyuModule

__all__ = ["FuyuImageTransform", "FuyuMediaSpec", "FuyuModel", "FuyuModule"]
