"""FuyuModel: the math of the Fuyu family (no vision tower: image patches → one linear → the LM).

An image is resized to fit a canvas of `image_height` × `image_width` (never enlarged, aspect
kept) and padded to it at the bottom and right, as transformers' `FuyuImageProcessor` does. Its
patches are the `patch_size` squares that cover the resized image (a partial patch at the right or
bottom edge included, with the padding in it), in row-major order; each is flattened as
(row, column, channel) and linearly embedded (`vision`, Fuyu's `vision_embed_tokens`). In the
text an image is `rows` lines of `cols` placeholders (`|SPEAKER|`), each line closed by
`|NEWLINE|`, between the family's `image_prefix` and `image_suffix` tokens; the patch embeddings
replace the placeholders in order. The LM is the Persimmon causal LM of a Fuyu checkpoint
(`lmm.families.fuyu.convert.import_checkpoint` splits one into lmm's layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lmm.components.language import CausalLM
from lmm.components.merge import scatter_tokens
from lmm.components.pretrained import reads_weights
from lmm.data.batch import Batch
from lmm.data.media import normalize
from lmm.data.processor import MediaMode, MediaSpec
from lmm.families.model import FamilyModel, joins_collectives, with_unused
from lmm.training.checkpoint import load_safetensors
from lmm.training.strategies import FSDP2Config, apply_fsdp2

IMAGE_TOKEN = "|SPEAKER|"  # Fuyu's placeholder of a patch (its config's image_token_id)
NEWLINE_TOKEN = "|NEWLINE|"  # ends each row of patches
PAD_VALUE = 1  # canvas fill, 0..255 scale (FuyuImageProcessor's padding_value 1.0 before rescale)
MEAN = STD = 0.5  # FuyuImageProcessor's normalisation, after scaling to 0..1


def resized_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of original `size` once fitted into `canvas` (never enlarged).

    FuyuImageProcessor's rule: scale by min(H / h, W / w) and truncate, only if the image is
    larger than the canvas in some side.
    """
    (h, w), (canvas_h, canvas_w) = size, canvas
    if h <= canvas_h and w <= canvas_w:
        return h, w
    scale = min(canvas_h / h, canvas_w / w)
    return max(1, int(h * scale)), max(1, int(w * scale))  # max: a 1-px-thin image keeps a row


def patch_grid(size: tuple[int, int], canvas: tuple[int, int], patch: int) -> tuple[int, int]:
    """(rows, cols) of patches an image of original (height, width) `size` becomes."""
    h, w = resized_size(size, canvas)
    return math.ceil(h / patch), math.ceil(w / patch)


@dataclass(frozen=True)
class FuyuImageTransform:
    """PIL image → `[3, height, width]`: fitted into the canvas, padded bottom/right, normalised.

    Bit-identical to transformers' `FuyuImageProcessorPil` (PIL bilinear resize, pad value 1 on
    the 0..255 scale, x / 255 in float64 then float32, (x - 0.5) / 0.5).
    """

    height: int
    width: int

    @property
    def size(self) -> int:
        """The canvas's longer side (callers that assume square images read this)."""
        return max(self.height, self.width)

    def __call__(self, img: Image.Image) -> Tensor:
        img = img.convert("RGB")
        h, w = resized_size((img.height, img.width), (self.height, self.width))
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), Image.BILINEAR)
        canvas = np.full((self.height, self.width, 3), PAD_VALUE, dtype=np.uint8)
        canvas[:h, :w] = np.asarray(img)
        return normalize(canvas, (MEAN,) * 3, (STD,) * 3)  # [3, H, W]


@dataclass(frozen=True)
class FuyuMediaSpec(MediaSpec):
    """Fuyu's pixels and tokens: one padded canvas per image, a placeholder per patch, row breaks.

    The token count depends on the image's original size (`size_dependent`): rows × (cols + 1)
    plus the prefix and suffix tokens, for each image or video frame.
    """

    transform: FuyuImageTransform
    patch_size: int
    newline_token: str = NEWLINE_TOKEN
    image_prefix: tuple[str, ...] = ()
    image_suffix: tuple[str, ...] = ("<s>",)
    size_dependent = True

    @property
    def canvas(self) -> tuple[int, int]:
        return self.transform.height, self.transform.width

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of patches of an image of original (height, width)."""
        return patch_grid(image_size, self.canvas, self.patch_size)

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        rows, cols = self.grid(image_size)
        return rows * cols

    def views(self, image: Image.Image, mode: MediaMode) -> Tensor:
        return self.transform(image)[None]  # [1, 3, H, W]

    def marker_tokens(
        self, image_size: tuple[int, int], mode: MediaMode, frames: int = 1
    ) -> list[str | None]:
        rows, cols = self.grid(image_size)
        lines = ([None] * cols + [self.newline_token]) * rows
        return [*self.image_prefix, *lines, *self.image_suffix] * frames


class FuyuModel(FamilyModel):
    """Patch embedding + Persimmon causal LM, with each patch's embedding at its placeholder."""

    default_image_token = IMAGE_TOKEN

    def __init__(
        self,
        llm: CausalLM,
        patch_size: int = 30,
        image_height: int = 1080,
        image_width: int = 1920,
        patch_embedding: str | None = None,
        image_prefix: tuple[str, ...] = (),
        image_suffix: tuple[str, ...] = ("<s>",),
        newline_token: str = NEWLINE_TOKEN,
    ):
        """
        Args:
            llm: the causal LM (Fuyu's Persimmon, as `lmm convert import` writes it to `llm/`).
            patch_size: side of a square patch in pixels (Fuyu-8B: 30).
            image_height: canvas height: images are fitted into the canvas and padded to it
                (Fuyu-8B 1080; Mantis-Fuyu 720). A multiple of `patch_size`.
            image_width: canvas width (Fuyu-8B 1920; Mantis-Fuyu 1280, rounded up to 1290).
            patch_embedding: a safetensors file with the patch embedding's `weight`
                `[D, 3 * patch_size ** 2]` and `bias` `[D]` (`patch_embedding.safetensors` of
                an import); None starts it at random.
            image_prefix: tokens before an image's patches (Mantis-Fuyu: `|IMAGE|`).
            image_suffix: tokens after them (Fuyu: `<s>`; Mantis-Fuyu: `|ENDOFIMAGE|`, `<s>`).
            newline_token: the token that ends each row of patches.
        """
        super().__init__()
        for name, side in (("image_height", image_height), ("image_width", image_width)):
            if side <= 0 or side % patch_size:
                up = max(1, math.ceil(side / patch_size)) * patch_size
                raise ValueError(
                    f"FuyuModel: {name}={side} is not a positive multiple of patch_size="
                    f"{patch_size}; round it up to {up} (as Mantis does: 1280 → 1290 for 30 px)"
                )
        self.llm = llm
        self.patch_size = patch_size
        self.canvas = (image_height, image_width)
        self.image_prefix = tuple(image_prefix)
        self.image_suffix = tuple(image_suffix)
        self.newline_token = newline_token
        dtype = llm.model.get_input_embeddings().weight.dtype
        self.vision = nn.Linear(3 * patch_size**2, llm.hidden_size, dtype=dtype)
        if patch_embedding is not None and reads_weights():  # (meta: rank 0's come later)
            self.load_patch_embedding(patch_embedding)

    def load_patch_embedding(self, path: str | Path) -> None:
        """Load `weight` and `bias` from a safetensors file into the patch embedding, strictly."""
        state = load_safetensors(path)  # hashes checked when lmm wrote it
        expected = {k: tuple(v.shape) for k, v in self.vision.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise ValueError(
                f"{path}: patch embedding tensors {got}, but patch_size={self.patch_size} and "
                f"the LLM's width give {expected}; is patch_size the checkpoint's?"
            )
        self.vision.load_state_dict({k: v.to(self.vision.weight.dtype) for k, v in state.items()})

    def media_spec(self) -> FuyuMediaSpec:
        return FuyuMediaSpec(
            FuyuImageTransform(*self.canvas),
            self.patch_size,
            self.newline_token,
            self.image_prefix,
            self.image_suffix,
        )

    def special_tokens(self) -> list[str]:
        """The image token and the tokens an image's text holds (Fuyu's own tokenizer has
        `|SPEAKER|` and `|NEWLINE|` as ordinary pieces; Mantis adds `|IMAGE|`, `|ENDOFIMAGE|`)."""
        return [IMAGE_TOKEN, self.newline_token, *self.image_prefix, *self.image_suffix]

    def parts(self) -> dict[str, nn.Module]:
        """`vision` (the patch embedding) and `llm`."""
        return {"vision": self.vision, "llm": self.llm}

    def shard(self, mesh: DeviceMesh, config: FSDP2Config) -> None:
        """The FSDP2 plan: decoder layers, then the root. The patch embedding is one linear
        layer with no layer stack of its own: it is sharded with the root (embeddings,
        lm_head), not as a vision unit."""
        apply_fsdp2(self, None, self.llm.model, mesh, config)

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D]
        """Token embeddings of the batch with every patch embedding at its placeholder."""
        embeds = self.llm.embed(batch.input_ids)
        if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
            patches, per_row = self.patches(batch)
            features = self.vision(patches.to(self.vision.weight.dtype))  # [P, D]
            (h, w), p = self.canvas, self.patch_size
            return scatter_tokens(  # each patch is one token
                embeds,
                batch.input_ids,
                image_token_id,
                features,
                per_row,
                batch.ids,
                lambda b: f"{per_row[b]} patches: canvas {h}x{w}, patch {p}",
                "image (canvas or patch size)",
            )
        if joins_collectives(self):
            return with_unused(embeds, self.vision(embeds.new_zeros(1, self.vision.in_features)))
        return embeds

    def patches(self, batch: Batch) -> tuple[Tensor, list[int]]:
        """The flattened patches `[P, 3 * p * p]` of every view in order, and their count per row.

        A view's patches cover its resized image (from its media item's original size), row
        by row; patches wholly in the padding are left out.
        """
        pixels = batch.pixel_values  # [N, 3, H, W]
        n, _, height, width = pixels.shape
        if (height, width) != self.canvas:
            raise ValueError(
                f"pixel_values are {height}x{width} but the Fuyu canvas is "
                f"{self.canvas[0]}x{self.canvas[1]}: the data was processed with another media "
                "spec; connect the data module to this model's media_spec()"
            )
        grids = self._view_grids(batch)  # [N, 2] (rows, cols)
        p = self.patch_size
        grid = pixels.unfold(2, p, p).unfold(3, p, p)  # [N, 3, H/p, W/p, p, p]
        grid = grid.permute(0, 2, 3, 4, 5, 1).reshape(n, height // p, width // p, 3 * p * p)
        rows = torch.arange(height // p, device=pixels.device)
        cols = torch.arange(width // p, device=pixels.device)
        g = grids.to(pixels.device)
        keep = (rows[None, :, None] < g[:, 0, None, None]) & (
            cols[None, None, :] < g[:, 1, None, None]
        )
        per_view = (grids[:, 0] * grids[:, 1]).tolist()
        per_row, start = [], 0
        for k in batch.views_per_sample:
            per_row.append(sum(per_view[start : start + k]))
            start += k
        return grid[keep], per_row

    def _view_grids(self, batch: Batch) -> Tensor:  # -> [N_views, 2] (rows, cols)
        n = batch.pixel_values.shape[0]
        views = batch.views_per_media
        if batch.image_sizes is None or sum(views) != n or len(views) != len(batch.image_sizes):
            raise ValueError(
                f"batch {batch.ids}: {n} pixel views but image_sizes / views_per_media describe "
                f"{sum(views)} views of {0 if batch.image_sizes is None else len(batch.image_sizes)}"
                " media items; Fuyu needs each image's original size: build batches with "
                "lmm.data.processor.Processor and its collators"
            )
        spec = self.media_spec()
        grids = [spec.grid((int(h), int(w))) for h, w in batch.image_sizes.tolist()]
        return torch.tensor(grids, dtype=torch.long).repeat_interleave(torch.tensor(views), dim=0)
