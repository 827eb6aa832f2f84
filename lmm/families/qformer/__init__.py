"""The Q-Former family: BLIP-2 vision tower → Q-Former → projection → causal LM, with VPG-C (Cheetah)."""

from lmm.families.qformer.model import VPGC, QFormerMediaSpec, QFormerModel, VPGCContext
from lmm.families.qformer.module import QFormerModule

__all__ = ["VPGC", "QFormerMediaSpec", "QFormerModel", "QFormerModule", "VPGCContext"]
