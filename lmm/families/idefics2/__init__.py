"""The Idefics2 family: SigLIP-style tower → perceiver resampler → Mistral (Mantis-Idefics2, VideoScore)."""

from lmm.families.idefics2.model import (
    Idefics2MediaSpec,
    Idefics2Model,
    Idefics2Vision,
    PerceiverConnector,
)
from lmm.families.idefics2.module import Idefics2Module

__all__ = [
    "Idefics2MediaSpec",
    "Idefics2Model",
    "Idefics2Module",
    "Idefics2Vision",
    "PerceiverConnector",
]
