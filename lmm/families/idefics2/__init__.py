"""The Idefics2 family: SigLIP-style tower → perceiver resampler → Mistral (Mantis-Idefics2, VideoScore)."""

from lmm.families.idefics2.model import (
    Idefics2MediaSpec,
    Idefics2Model,
    Idefics2Vision,
    PerceiverConnector,
)
from lmm.families.registry import Family, Layout

FAMILY = Family(
    "idefics2",
    model="lmm.families.idefics2.Idefics2Model",
    layouts=(
        Layout(
            "idefics2",
            "transformers Idefics2 (Mantis-Idefics2)",
            "lmm.data.templates.MantisIdefics2",
            transformers=("Idefics2ForConditionalGeneration",),
            default_template="lmm.data.templates.Idefics2",
        ),
    ),
    exports_to=("Idefics2ForConditionalGeneration",),
)

__all__ = ["FAMILY", "Idefics2MediaSpec", "Idefics2Model", "Idefics2Vision", "PerceiverConnector"]
