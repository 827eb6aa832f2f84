"""Vision encoders: transformers CLIP / SigLIP vision towers with LLaVA's feature selection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from torch import Tensor, nn
from transformers import CLIPVisionModel, SiglipVisionModel

from lmm.components.attention import resolve_attention
from lmm.components.language import _dtype
from lmm.components.pretrained import from_pretrained, load_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class VisionEncoder(nn.Module):
    """Base role: images `[N, 3, H, W]` → features `[N, T, out_dim]`."""

    out_dim: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def num_tokens(self, image_size: tuple[int, int]) -> int:
        """Number of feature tokens for an image of (height, width) after the transform."""
        raise NotImplementedError


class HFVisionTower(VisionEncoder):
    """A transformers CLIP or SigLIP vision model; features from one hidden layer.

    `select="default"` drops token 0 (the CLS token of CLIP; LLaVA and Mantis drop it for SigLIP
    too), `select="full"` keeps every token.
    """

    def __init__(
        self,
        path: str,
        feature_layer: int = -2,
        select: Literal["default", "full"] = "default",
        attn_implementation: str = "auto",
        dtype: str = "float32",
    ):
        """
        Args:
            path: folder or hub id of a CLIP/SigLIP model or vision model (`from_pretrained`).
            feature_layer: index into `hidden_states` (-2 = the penultimate layer, as LLaVA).
            select: `default` drops token 0, `full` keeps all tokens.
            attn_implementation: `auto`, `sdpa` or `eager` (flash-attn only where supported;
                `auto` on the CPU: `sdpa_short`, sdpa with short bf16 sequences as matmuls).
            dtype: parameter dtype.
        """
        super().__init__()
        if select not in ("default", "full"):
            raise ValueError(f"select must be 'default' or 'full', got {select!r}")
        config = load_config(path)
        kind = config.model_type.removesuffix("_vision_model")
        classes = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
        if kind not in classes:
            raise ValueError(
                f"{path}: vision tower must be CLIP or SigLIP, got {config.model_type!r}"
            )
        attn = resolve_attention(attn_implementation, short=True)
        if attn == "flash_attention_2":
            attn = "sdpa"  # the vision towers run at fixed length; sdpa is exact and fast
        self.model = from_pretrained(
            classes[kind], path, attn_implementation=attn, dtype=_dtype(dtype)
        )
        vcfg = self.model.config
        self.kind = kind
        self.feature_layer, self.select = feature_layer, select
        self.out_dim = vcfg.hidden_size
        self.image_size = vcfg.image_size
        self.patch_size = vcfg.patch_size
        self.image_mean, self.image_std = normalization(path, kind)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Freeze what the features never pass through: layers after `feature_layer`, the post
        layernorm and SigLIP's pooling head (weights kept, for export and import layouts).

        They would get no gradient ever; a trainable parameter without one has no optimizer
        state, and a sharded (FSDP2) checkpoint then fails to load.
        """
        vision = getattr(self.model, "vision_model", self.model)  # transformers v4 / v5
        layers = vision.encoder.layers
        n = len(layers)
        used = n + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer
        if not 0 <= used <= n:
            raise ValueError(
                f"feature_layer {self.feature_layer} is out of range for a tower of {n} layers "
                f"(hidden states -{n + 1}..{n})"
            )
        unused = list(layers[used:]) + [vision.post_layernorm, getattr(vision, "head", None)]
        for module in unused:
            if module is not None:
                module.requires_grad_(False)

    def sequence_length(self, image_size: tuple[int, int]) -> int:
        """Tokens the encoder runs on: the patches, plus CLIP's CLS token."""
        h, w = image_size
        return (h // self.patch_size) * (w // self.patch_size) + (self.kind == "clip")

    def num_tokens(self, image_size: tuple[int, int]) -> int:
        return self.sequence_length(image_size) - (self.select == "default")

    def forward(self, pixel_values: Tensor) -> Tensor:  # [N, 3, H, W] -> [N, T, D]
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        # contiguous: a view out of an FSDP2 unit is unsafe for in-place ops downstream
        return features[:, 1:].contiguous() if self.select == "default" else features


def normalization(path: str, kind: str) -> tuple[tuple, tuple]:
    """Mean and std from the checkpoint's `preprocessor_config.json`, else the family default."""
    default = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return default
    cfg = json.loads(file.read_text())
    return tuple(cfg.get("image_mean", default[0])), tuple(cfg.get("image_std", default[1]))
