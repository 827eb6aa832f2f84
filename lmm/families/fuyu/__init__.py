"""The Fuyu family: image patches linearly embedded into a Persimmon LM (Fuyu-8B, Mantis-8B-Fuyu)."""

from lmm.families.fuyu.model import FuyuImageTransform, FuyuMediaSpec, FuyuModel
from lmm.families.registry import Family, Layout

FAMILY = Family(
    "fuyu",
    model="lmm.families.fuyu.FuyuModel",
    layouts=(
        Layout(
            "fuyu",
            "transformers Fuyu (Mantis-Fuyu)",
            "lmm.data.templates.MantisFuyu",
            transformers=("FuyuForCausalLM",),
        ),
    ),
    exports_to=("FuyuForCausalLM",),
)

__all__ = ["FAMILY", "FuyuImageTransform", "FuyuMediaSpec", "FuyuModel"]
