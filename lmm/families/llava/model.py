"""LlavaModel: the math of the LLaVA family (encode images, project, scatter into the LLM).

Classic LLaVA by default (one view per image, a fixed token count); with `anyres` it is
LLaVA-OneVision (tiles, unpadding, newlines, pooled video frames; lmm.components.anyres).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from torch import Tensor, nn

from lmm.components.anyres import Anyres, AnyresLayout, select_best_resolution
from lmm.components.connectors import Connector, MLPConnector
from lmm.components.language import CausalLM
from lmm.components.merge import scatter_items, scatter_media
from lmm.components.vision import VisionEncoder
from lmm.data.batch import Batch
from lmm.data.media import ImageTransform, expand_to_square, fit_and_pad, split_tiles
from lmm.data.processor import MediaMode, MediaSpec
from lmm.families.model import FamilyModel, joins_collectives, with_unused


@dataclass(frozen=True)
class LlavaMediaSpec(MediaSpec):
    """Tokens per image and the image transform, as the LLaVA family sees them."""

    transform: ImageTransform
    tokens: int  # feature slots per view
    # the transform of the images of a multi-image sample, when it differs
    multi_transform: ImageTransform | None = field(default=None, kw_only=True)

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        return self.tokens

    def views(self, image: Image.Image, mode: MediaMode) -> Tensor:
        if mode == "multi" and self.multi_transform is not None:
            return self.multi_transform(image)[None]
        return self.transform(image)[None]


@dataclass(frozen=True)
class OneVisionMediaSpec(LlavaMediaSpec):
    """LLaVA-OneVision's views and token counts, known from the original size before decoding.

    `image`: the image squashed to a tile (the base), then the tiles of the image fitted into
    its best resolution on black; `multi`: padded to a square with the mean colour; video
    frames: squashed to a tile. `transform` has aspect `resize` and only normalises tiles.
    """

    anyres: AnyresLayout
    size_dependent = True  # token counts depend on the original size

    def views(self, image: Image.Image, mode: MediaMode) -> Tensor:
        s = self.transform.size
        if mode == "image":
            best = select_best_resolution((image.height, image.width), self.anyres.pinpoints)
            pieces = [
                image.resize((s, s), Image.BICUBIC),
                *split_tiles(fit_and_pad(image, best), s),
            ]
        elif mode == "multi":  # LLaVA-NeXT's expand2square fills with int(mean * 255)
            fill = tuple(int(m * 255) for m in self.transform.mean)
            pieces = [expand_to_square(image, fill)]
        else:
            pieces = [image]
        return torch.stack([self.transform(p) for p in pieces])  # [V, 3, s, s]

    def marker_tokens(
        self, image_size: tuple[int, int], mode: MediaMode, frames: int = 1
    ) -> list[str | None]:
        return [None] * self.anyres.num_tokens(image_size, mode, frames)


class LlavaModel(FamilyModel):
    """Vision tower → connector → causal LM, with image features at the `<image>` positions."""

    def __init__(
        self,
        vision: VisionEncoder,
        llm: CausalLM,
        connector: Callable[[int, int], Connector] = MLPConnector,
        image_aspect: Literal["pad", "resize", "crop"] = "pad",
        anyres: Callable[[int, int, int], Anyres] | None = None,
        multi_image_aspect: Literal["pad", "resize", "crop"] | None = None,
    ):
        """
        Args:
            vision: the vision tower (CLIP or SigLIP, with its feature layer and selection).
            llm: the causal language model.
            connector: connector class and arguments; built with (vision width, LLM width).
            image_aspect: how images become squares: `pad` (LLaVA), `resize` or `crop` (CLIP).
                Unused with `anyres`, whose views are fixed by OneVision.
            anyres: LLaVA-OneVision's image layout (lmm.components.anyres.Anyres: tiles,
                `anyres_max_N`, `image_newline`, video pooling); built with (LLM width, tile
                size, tokens per tile side). None = classic LLaVA.
            multi_image_aspect: `image_aspect` for the images of a sample with several
                (LLaVA-NeXT pads those whatever `image_aspect_ratio` says); None: the same.
        """
        super().__init__()
        self.vision = vision
        self.llm = llm
        self.connector = connector(vision.out_dim, llm.hidden_size)
        self.image_aspect = image_aspect
        self.multi_image_aspect = multi_image_aspect
        self.anyres: Anyres | None = None
        if anyres is not None:
            size = vision.image_size
            tokens = self.connector.num_tokens(vision.num_tokens((size, size)))
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(
                    f"anyres lays tiles out as square grids of tokens, but a {size}px view gives "
                    f"{tokens} tokens; keep every patch token and no CLS token (SigLIP "
                    "select: full, CLIP select: default)"
                )
            self.anyres = anyres(llm.hidden_size, size, side)

    def parts(self) -> dict[str, nn.Module]:
        """`vision`, `connector`, `llm` and, with anyres (OneVision), `newline` (the learned
        `image_newline`)."""
        parts = {"vision": self.vision, "connector": self.connector, "llm": self.llm}
        if self.anyres is not None:
            parts["newline"] = self.anyres
        return parts

    def media_spec(self) -> LlavaMediaSpec:
        v = self.vision
        size = (v.image_size, v.image_size)
        tokens = self.connector.num_tokens(v.num_tokens(size))
        if self.anyres is not None:
            transform = ImageTransform(v.image_size, v.image_mean, v.image_std, "resize")
            return OneVisionMediaSpec(transform, tokens, self.anyres.layout)
        transform = ImageTransform(v.image_size, v.image_mean, v.image_std, self.image_aspect)
        multi = None
        if self.multi_image_aspect not in (None, self.image_aspect):
            multi = ImageTransform(v.image_size, v.image_mean, v.image_std, self.multi_image_aspect)
        return LlavaMediaSpec(transform, tokens, multi_transform=multi)

    def encode_images(self, pixel_values: Tensor) -> Tensor:  # [N, 3, H, W] -> [N, T, D_llm]
        return self.connector(self.vision(pixel_values))

    def media_features(self, batch: Batch) -> list[Tensor]:
        """OneVision: each media item's tokens `[N_i, D_llm]`, all views encoded in one forward."""
        if self.anyres is None:
            raise ValueError("media_features lays out anyres items; this model has anyres: null")
        features = self.encode_images(batch.pixel_values)  # [N_views, T, D]
        views = list(batch.views_per_media)
        if sum(views) != features.shape[0] or len(views) != len(batch.media_modes):
            raise ValueError(
                f"batch has {features.shape[0]} pixel views but views_per_media {views} for "
                f"modes {batch.media_modes}; build batches with lmm.data collators"
            )
        sizes = batch.image_sizes.tolist()
        return [
            self.anyres(chunk, tuple(size), mode)
            for chunk, size, mode in zip(
                features.split(views), sizes, batch.media_modes, strict=True
            )
        ]

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D_llm]
        """Token embeddings of the batch with every image's features at its placeholders.

        With `anyres`, a batch without per-item fields (`views_per_media`, built by hand rather
        than by the collators) is read the classic way: each pixel row one image of T tokens.
        """
        embeds = self.llm.embed(batch.input_ids)
        has_media = batch.pixel_values is not None and batch.pixel_values.shape[0] > 0
        if has_media and self.anyres is not None and batch.views_per_media:
            items = self.media_features(batch)
            per_row = batch.items_per_row()
            if joins_collectives(self):  # every rank's newline, even with `no_token` videos
                embeds = with_unused(embeds, self.anyres.image_newline)
            return scatter_items(embeds, batch.input_ids, image_token_id, items, per_row, batch.ids)
        features = None
        if has_media:
            features = self.encode_images(batch.pixel_values)
        elif joins_collectives(self):
            size = self.vision.image_size
            unused = [self.encode_images(embeds.new_zeros(1, 3, size, size))]
            if self.anyres is not None:
                unused.append(self.anyres.image_newline)
            embeds = with_unused(embeds, *unused)
        return scatter_media(
            embeds, batch.input_ids, image_token_id, features, batch.views_per_sample, batch.ids
        )
