"""Idefics2Model: the math of the Idefics2 family (SigLIP-style tower → perceiver connector → LLM).

The vision tower and the connector are transformers' own Idefics2 modules
(`Idefics2VisionTransformer`, `Idefics2Connector` = modality projection + perceiver resampler),
read from a transformers Idefics2 checkpoint; the LLM is a `CausalLM` (Mistral for Idefics2).

Images keep their aspect ratio, as `Idefics2ImageProcessor` does: each view (the image, or with
`do_image_splitting` its 4 quarter crops and the image) is resized between `shortest_edge` and
`longest_edge`, normalised and padded at the bottom and right to `longest_edge` square, so that
every view of a batch has one shape. The valid region of each view follows from the original
size (`Batch.image_sizes`) by the same resize rule (`view_sizes`); the vision tower attends only
to the patches inside it and the perceiver reads only those, exactly as transformers does with
its `pixel_attention_mask`. Each view becomes `image_seq_len` (the perceiver's latent count)
LLM tokens, written between `<fake_token_around_image>` tokens (`Idefics2MediaSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoConfig
from transformers.initialization import no_init_weights
from transformers.models.idefics2 import modeling_idefics2 as hf

from lmm.components.attention import resolve_attention
from lmm.components.language import CausalLM, _dtype
from lmm.components.merge import scatter_media
from lmm.components.pretrained import reads_weights
from lmm.components.qformer import checkpoint_tensors
from lmm.components.vision import VisionEncoder
from lmm.data.batch import Batch
from lmm.data.media import ImageTransform
from lmm.data.processor import MediaMode, MediaSpec
from lmm.families.hf import processor_configs
from lmm.families.model import FamilyModel, joins_collectives, with_unused

IDEFICS2 = "idefics2"  # model_type of a whole transformers Idefics2 checkpoint
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
# transformers' Idefics2ImageProcessor defaults (IMAGENET_STANDARD mean / std)
IDEFICS2_MEAN = IDEFICS2_STD = (0.5, 0.5, 0.5)
SPLITS = 4  # quarter crops of `do_image_splitting`, before the whole image


def resized_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """(height, width) after Idefics2's resize: the long side down to `longest`, each side ≥ `shortest`.

    transformers' `get_resize_output_image_size` (idefics2), integer rounding included.
    """
    aspect = width / height
    if width >= height and width > longest:
        width = longest
        height = int(width / aspect)
    elif height > width and height > longest:
        height = longest
        width = int(height * aspect)
    return max(height, shortest), max(width, shortest)


def split_boxes(height: int, width: int, split: bool) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each view of an image: the quarters (if `split`), then itself."""
    whole = (0, 0, height, width)
    if not split:
        return [whole]
    mh, mw = height // 2, width // 2
    return [(0, 0, mh, mw), (0, mw, mh, width), (mh, 0, height, mw), (mh, mw, height, width), whole]


def view_sizes(
    height: int, width: int, split: bool, shortest: int, longest: int
) -> list[tuple[int, int]]:
    """(height, width) of each view of an image of (height, width) after resizing."""
    return [
        resized_size(bottom - top, right - left, shortest, longest)
        for top, left, bottom, right in split_boxes(height, width, split)
    ]


def _attention(attn_implementation: str) -> str:
    attn = resolve_attention(attn_implementation)
    return "sdpa" if attn == "flash_attention_2" else attn  # masked, padded: sdpa is exact


def _idefics2_config(path: str):
    config = AutoConfig.from_pretrained(path)
    if config.model_type != IDEFICS2:
        raise ValueError(
            f"{path}: model_type {config.model_type!r}, expected a transformers Idefics2 "
            f"checkpoint ({IDEFICS2!r}); import one with lmm.families.idefics2.convert"
        )
    return config


def _load_tensors(module: nn.Module, path: str, prefix: str) -> None:
    """Load the `prefix*` tensors of the checkpoint at `path` into `module`, strictly (none
    when built on the meta device: rank 0's weights come after sharding)."""
    if not reads_weights():
        return
    try:
        state = checkpoint_tensors(path, prefix)
    except (FileNotFoundError, KeyError) as err:
        raise ValueError(
            f"{path}: cannot read the '{prefix}*' tensors of an Idefics2 checkpoint ({err}); "
            "give a transformers Idefics2 folder saved with safetensors"
        ) from err
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the '{prefix}*' tensors do not fit {type(module).__name__}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


class Idefics2Vision(VisionEncoder):
    """Idefics2's vision tower (SigLIP with NaViT-style positions for any aspect ratio).

    Features are the last hidden state after `post_layernorm`, one per patch of the padded
    view; patches outside a view's valid region are masked out of attention.
    """

    def __init__(self, path: str, attn_implementation: str = "auto", dtype: str = "float32"):
        """
        Args:
            path: folder or hub id of a transformers Idefics2 checkpoint; only its
                `model.vision_model.*` tensors are read (only the shards holding them).
            attn_implementation: `auto`, `sdpa` or `eager`.
            dtype: parameter dtype.
        """
        super().__init__()
        config = _idefics2_config(path)
        with no_init_weights():  # every parameter comes from the checkpoint
            self.model = hf.Idefics2VisionTransformer._from_config(
                config.vision_config,
                attn_implementation=_attention(attn_implementation),
                dtype=_dtype(dtype),
            )
        _load_tensors(self.model, path, "model.vision_model.")
        self.model.to(_dtype(dtype))
        vcfg = self.model.config
        self.out_dim = vcfg.hidden_size
        self.image_size = vcfg.image_size  # the position grid, reached by any view size
        self.patch_size = vcfg.patch_size
        pre, _ = processor_configs(path)
        self.image_mean = tuple(pre.get("image_mean", IDEFICS2_MEAN))
        self.image_std = tuple(pre.get("image_std", IDEFICS2_STD))

    def sequence_length(self, image_size: tuple[int, int]) -> int:
        """Tokens the encoder runs on for a padded view of (height, width): all its patches."""
        return (image_size[0] // self.patch_size) * (image_size[1] // self.patch_size)

    def num_tokens(self, image_size: tuple[int, int]) -> int:
        return self.sequence_length(image_size)

    def forward(
        self,
        pixel_values: Tensor,  # [N, 3, H, W]
        patch_mask: Tensor,  # [N, H / patch, W / patch] bool, True = a patch inside the view
    ) -> Tensor:  # [N, H / patch * W / patch, D_v]
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), patch_attention_mask=patch_mask)
        return out.last_hidden_state


class PerceiverConnector(nn.Module):
    """Idefics2's connector: modality projection (SwiGLU MLP) then the perceiver resampler.

    Takes the vision features of a view and its patch mask, returns `num_latents` vectors of
    the LLM width. transformers' `Idefics2Connector`, weights from the checkpoint.
    """

    def __init__(self, path: str, attn_implementation: str = "auto", dtype: str = "float32"):
        """
        Args:
            path: folder or hub id of a transformers Idefics2 checkpoint; only its
                `model.connector.*` tensors are read (only the shards holding them).
            attn_implementation: `auto`, `sdpa` or `eager` (the perceiver's cross-attention).
            dtype: parameter dtype.
        """
        super().__init__()
        config = _idefics2_config(path)
        config.perceiver_config._attn_implementation = _attention(attn_implementation)
        self.config = config  # the checkpoint's Idefics2 config (export writes it back)
        with no_init_weights():
            self.model = hf.Idefics2Connector(config)
        _load_tensors(self.model, path, "model.connector.")
        self.model.to(_dtype(dtype))
        self.in_dim = config.vision_config.hidden_size
        self.out_dim = config.text_config.hidden_size

    @property
    def num_latents(self) -> int:
        """LLM tokens per view: the perceiver's latent count (Idefics2: 64)."""
        return self.model.perceiver_resampler.n_latents

    def forward(
        self,
        features: Tensor,  # [N, P, D_v]
        patch_mask: Tensor,  # [N, P] bool
    ) -> Tensor:  # [N, num_latents, D_llm]
        dtype = next(self.model.parameters()).dtype
        return self.model(features.to(dtype), attention_mask=patch_mask)


@dataclass(frozen=True)
class Idefics2MediaSpec(MediaSpec):
    """Idefics2's views, and its token layout: `<fake>` + (`image_seq_len` slots + `<fake>`) per view.

    That is the layout transformers' `Idefics2Processor` writes for one `<image>`, including its
    merge of the `<fake><fake>` between the sub-images of a split image; a video's frames are
    consecutive images, merged the same way. `transform` is nominal (its `size` is the padded
    view side); `views` does the resizing.
    """

    transform: ImageTransform
    image_seq_len: int
    do_image_splitting: bool
    shortest_edge: int
    longest_edge: int
    fake_token: str

    @property
    def boundary_token(self) -> str:
        """`<fake_token_around_image>`: written once where two images meet."""
        return self.fake_token

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        return self.image_seq_len

    def views(self, image: Image.Image, mode: MediaMode) -> Tensor:
        """`[V, 3, L, L]`: each view resized (bilinear), normalised, padded with 0 at bottom/right."""
        w, h = image.size
        if self.do_image_splitting and min(h, w) < 2:
            raise ValueError(
                f"a {w}x{h} image cannot be split into quarters (do_image_splitting); "
                "use images of at least 2x2 pixels"
            )
        side = self.longest_edge
        mean = torch.tensor(self.transform.mean).view(3, 1, 1)
        std = torch.tensor(self.transform.std).view(3, 1, 1)
        out = torch.zeros(len(split_boxes(h, w, self.do_image_splitting)), 3, side, side)
        for k, (top, left, bottom, right) in enumerate(split_boxes(h, w, self.do_image_splitting)):
            crop = image.crop((left, top, right, bottom))
            vh, vw = resized_size(bottom - top, right - left, self.shortest_edge, side)
            crop = crop.resize((vw, vh), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out[k, :, :vh, :vw] = (x - mean) / std
        return out

    def marker_tokens(
        self, image_size: tuple[int, int], mode: MediaMode, frames: int = 1
    ) -> list[str | None]:
        views = (SPLITS + 1 if self.do_image_splitting else 1) * frames
        tokens: list[str | None] = [self.fake_token]
        for _ in range(views):
            tokens += [None] * self.image_seq_len + [self.fake_token]
        return tokens


class Idefics2Model(FamilyModel):
    """Vision tower → perceiver connector → causal LM, with view features at the `<image>` slots."""

    def __init__(
        self,
        vision: Idefics2Vision,
        connector: PerceiverConnector,
        llm: CausalLM,
        do_image_splitting: bool = False,
        shortest_edge: int = 378,
        longest_edge: int = 980,
        fake_image_token: str = FAKE_IMAGE_TOKEN,
    ):
        """
        Args:
            vision: the Idefics2 vision tower.
            connector: the modality projection + perceiver resampler.
            llm: the causal language model (Mistral for Idefics2).
            do_image_splitting: each image also gives its 4 quarter crops (5 views, Idefics2's
                `do_image_splitting`; Mantis-Idefics2 trains without).
            shortest_edge: each side of a resized view is at least this (Idefics2: 378).
            longest_edge: the long side of a view is resized down to this (Idefics2: 980); views
                are padded to this square.
            fake_image_token: the token written around every image view; added to the
                tokenizer (as a special token, with a new embedding row) if it lacks it.
        """
        super().__init__()
        if connector.in_dim != vision.out_dim or connector.out_dim != llm.hidden_size:
            raise ValueError(
                f"the connector maps width {connector.in_dim} → {connector.out_dim}, but the "
                f"vision tower gives {vision.out_dim} and the LLM takes {llm.hidden_size}; "
                "build vision, connector and LLM from the same Idefics2 checkpoint"
            )
        if not vision.patch_size <= shortest_edge <= longest_edge:
            raise ValueError(
                f"need patch_size ({vision.patch_size}) ≤ shortest_edge ({shortest_edge}) ≤ "
                f"longest_edge ({longest_edge})"
            )
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.do_image_splitting = do_image_splitting
        self.shortest_edge = shortest_edge
        self.longest_edge = longest_edge
        self.fake_image_token = fake_image_token

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    def special_tokens(self) -> list[str]:
        return [self.fake_image_token]

    def vision_tokens(self) -> tuple[int, int]:
        """Patches of a padded `longest_edge` view, run and handed on (upper bound: the patch
        mask leaves padding out)."""
        n = self.vision.num_tokens((self.longest_edge, self.longest_edge))
        return (n, n)

    def media_spec(self) -> Idefics2MediaSpec:
        v = self.vision
        transform = ImageTransform(self.longest_edge, v.image_mean, v.image_std, "resize")
        return Idefics2MediaSpec(
            transform=transform,
            image_seq_len=self.connector.num_latents,
            do_image_splitting=self.do_image_splitting,
            shortest_edge=self.shortest_edge,
            longest_edge=self.longest_edge,
            fake_token=self.fake_image_token,
        )

    def view_sizes(self, batch: Batch) -> Tensor:  # -> [N_views, 2] valid (height, width)
        """The valid region of every row of `batch.pixel_values`, from the items' original sizes."""
        n = batch.pixel_values.shape[0]
        if batch.image_sizes is None or len(batch.views_per_media) != len(batch.image_sizes):
            raise ValueError(
                f"batch {batch.ids[:4]}: {n} image views but no per-item image_sizes / "
                "views_per_media; Idefics2 needs them to mask the padding. Build batches with "
                "lmm.data.collate from lmm's Processor"
            )
        modes = batch.media_modes or ["image"] * len(batch.views_per_media)
        sizes: list[tuple[int, int]] = []
        for item, ((h, w), count, mode) in enumerate(
            zip(batch.image_sizes.tolist(), batch.views_per_media, modes, strict=True)
        ):
            views = view_sizes(h, w, self.do_image_splitting, self.shortest_edge, self.longest_edge)
            # an image has exactly its views, a video's frames a multiple of them
            if count % len(views) or (mode != "video" and count != len(views)):
                raise ValueError(
                    f"batch {batch.ids[:4]}: media item {item} ({mode}) has {count} views, but "
                    f"an image gives {len(views)} (do_image_splitting={self.do_image_splitting});"
                    " the data was processed for another setting"
                )
            sizes += views * (count // len(views))
        if len(sizes) != n:
            raise ValueError(
                f"batch {batch.ids[:4]}: views_per_media count {len(sizes)} views but "
                f"pixel_values holds {n}"
            )
        return torch.tensor(sizes, dtype=torch.long, device=batch.pixel_values.device)

    def patch_mask(self, sizes: Tensor, height: int, width: int) -> Tensor:
        """`[N, H / p, W / p]` bool: the patches wholly inside each view's valid (height, width)."""
        p = self.vision.patch_size
        rows = torch.arange(height // p, device=sizes.device)
        cols = torch.arange(width // p, device=sizes.device)
        inside_h = rows[None, :] < (sizes[:, 0] // p)[:, None]  # [N, H / p]
        inside_w = cols[None, :] < (sizes[:, 1] // p)[:, None]  # [N, W / p]
        return inside_h[:, :, None] & inside_w[:, None, :]

    def encode_images(
        self,
        pixel_values: Tensor,  # [N, 3, H, W] padded views
        sizes: Tensor,  # [N, 2] valid (height, width) of each view
    ) -> Tensor:  # [N, image_seq_len, D_llm]
        mask = self.patch_mask(sizes, pixel_values.shape[-2], pixel_values.shape[-1])
        features = self.vision(pixel_values, mask)  # [N, P, D_v]
        return self.connector(features, mask.flatten(1))

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D_llm]
        """Token embeddings of the batch with every view's latents at its image slots."""
        embeds = self.llm.embed(batch.input_ids)
        features = None
        if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
            features = self.encode_images(batch.pixel_values, self.view_sizes(batch))
        elif joins_collectives(self):
            side = self.longest_edge
            blank = embeds.new_zeros(1, 3, side, side)
            full = torch.tensor([[side, side]], device=embeds.device)
            embeds = with_unused(embeds, self.encode_images(blank, full))
        return scatter_media(
            embeds, batch.input_ids, image_token_id, features, batch.views_per_sample, batch.ids
        )
