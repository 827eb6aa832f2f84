"""LlavaModel: the math of the LLaVA family (encode images, project, scatter into the LLM)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmm.components.connectors import Connector, MLPConnector
from lmm.components.language import CausalLM
from lmm.components.merge import scatter_media
from lmm.components.vision import VisionEncoder
from lmm.data.batch import Batch
from lmm.data.media import ImageTransform
from lmm.data.processor import MediaSpec


@dataclass(frozen=True)
class LlavaMediaSpec(MediaSpec):
    """Tokens per image and the image transform, as the LLaVA family sees them."""

    transform: ImageTransform
    vision: VisionEncoder
    connector: Connector

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        return self.connector.num_tokens(self.vision.num_tokens(image_size))


class LlavaModel(nn.Module):
    """Vision tower → connector → causal LM, with image features at the `<image>` positions."""

    def __init__(
        self,
        vision: VisionEncoder,
        llm: CausalLM,
        connector: Callable[[int, int], Connector] = MLPConnector,
        image_aspect: Literal["pad", "resize", "crop"] = "pad",
    ):
        """
        Args:
            vision: the vision tower (CLIP or SigLIP, with its feature layer and selection).
            llm: the causal language model.
            connector: connector class and arguments; built with (vision width, LLM width).
            image_aspect: how images become squares: `pad` (LLaVA), `resize` or `crop` (CLIP).
        """
        super().__init__()
        self.vision = vision
        self.llm = llm
        self.connector = connector(vision.out_dim, llm.hidden_size)
        self.image_aspect = image_aspect

    def media_spec(self) -> LlavaMediaSpec:
        v = self.vision
        transform = ImageTransform(v.image_size, v.image_mean, v.image_std, self.image_aspect)
        return LlavaMediaSpec(transform, v, self.connector)

    def encode_images(self, pixel_values: Tensor) -> Tensor:  # [N, 3, H, W] -> [N, T, D_llm]
        return self.connector(self.vision(pixel_values))

    def forward(self, batch: Batch, image_token_id: int, attention_mask: Tensor | None) -> Tensor:
        """Logits `[B, L, V]`: embeddings with the images scattered in, through the LLM."""
        out = self.llm(
            inputs_embeds=self.embed(batch, image_token_id),
            attention_mask=attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return out.logits

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D_llm]
        """Token embeddings of the batch with every image's features at its placeholders."""
        embeds = self.llm.embed(batch.input_ids)
        features = None
        if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
            features = self.encode_images(batch.pixel_values)
        elif self.training and torch.distributed.is_initialized():
            # A rank whose batch has no image still runs the vision tower and connector on a
            # blank image, with a zero weight: sharded (FSDP) and DDP ranks must all take part
            # in the same collectives, and the gradients do not change.
            size = self.vision.image_size
            blank = embeds.new_zeros(1, 3, size, size)
            embeds = embeds + 0.0 * self.encode_images(blank).sum()
        return scatter_media(
            embeds, batch.input_ids, image_token_id, features, batch.media_per_sample, batch.ids
        )
