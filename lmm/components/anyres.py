"""LLaVA-OneVision's layout of image features: anyres tiles, unpadding, `anyres_max`, newlines, video pooling.

The geometry (the tile grid an image gets, the feature rows and columns left after unpadding,
how far `anyres_max_N` shrinks them) is computed here once and used both to count placeholder
tokens before any pixel is decoded and to lay the features out, so the two cannot disagree.
The math is transformers' `LlavaOnevisionModel` (`pack_image_features`, `get_video_features`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

VideoNewline = Literal["one_token", "grid", "frame", "no_token"]
"""Where video features get `image_newline`: once after the video (transformers), after every
row of every frame (LLaVA-NeXT's training default `grid`), after every frame, or nowhere."""

Mode = Literal["image", "multi", "video"]


def parse_pinpoints(spec: str | Sequence[Sequence[int]], tile: int) -> list[tuple[int, int]]:
    """Candidate resolutions as (height, width) pixels, from a list of pairs or a tile-grid string.

    Strings count tiles of `tile` pixels: `"(1x1),...,(6x6)"` is every grid from 1x1 to 6x6
    (LLaVA-NeXT's range syntax, rows outer), `"(1x1),(1x2),(2x1)"` exactly those grids.
    """
    if isinstance(spec, str):
        pairs = [(int(a), int(b)) for a, b in re.findall(r"\((\d+)x(\d+)\)", spec)]
        if not pairs:
            raise ValueError(
                f"grid_pinpoints {spec!r}: expected tile grids like '(1x1),...,(6x6)' or a "
                "list of [height, width] pixel pairs"
            )
        if "..." in spec:
            (r0, c0), (r1, c1) = pairs[0], pairs[-1]
            pairs = [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
        return [(r * tile, c * tile) for r, c in pairs]
    out = [(int(h), int(w)) for h, w in spec]
    bad = [p for p in out if p[0] % tile or p[1] % tile or min(p) <= 0]
    if not out or bad:
        raise ValueError(
            f"grid_pinpoints {list(spec)!r}: every [height, width] must be a positive multiple "
            f"of the tile size {tile} (bad: {bad}); give pixel pairs or '(1x1),...,(6x6)'"
        )
    return out


def select_best_resolution(
    size: tuple[int, int], candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The (height, width) that keeps most of the image's pixels, then wastes least (transformers)."""
    height, width = size
    best, most, least = candidates[0], 0, math.inf
    for h, w in candidates:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (h, w), effective, wasted
    return best


def unpad_box(rows: int, cols: int, size: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a `rows × cols` feature grid the original image covers.

    The tiles were cut from the image resized to fit the grid and centred with padding; this
    drops the padded rows (or columns), as transformers' `unpad_image`.
    """
    height, width = size
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return slice(0, rows), slice(pad, cols - pad)


@dataclass(frozen=True)
class AnyresLayout:
    """OneVision's geometry as plain values: views and token counts of a media item (see
    `Anyres`). The media spec holds it, so the data pipeline counts tokens without the model."""

    tile_size: int  # side of a tile in pixels
    grid: int  # side of one tile's feature grid
    pinpoints: tuple[tuple[int, int], ...]  # candidate (height, width) resolutions
    max_tiles: int | None
    video_stride: int
    video_newline: str

    def tiles(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of (height, width)."""
        h, w = select_best_resolution(size, self.pinpoints)
        return h // self.tile_size, w // self.tile_size

    def num_views(self, size: tuple[int, int], mode: Mode) -> int:
        """Pixel views one image becomes: base + tiles for `image`, else one."""
        if mode != "image":
            return 1
        rows, cols = self.tiles(size)
        return 1 + rows * cols

    def _layout(self, size: tuple[int, int]) -> tuple[int, int, slice, slice, tuple | None]:
        """Tile grid, the unpadded box of its features and the shrunk (h, w), if shrunk."""
        rows, cols = self.tiles(size)
        ys, xs = unpad_box(rows * self.grid, cols * self.grid, size)
        h, w = ys.stop - ys.start, xs.stop - xs.start
        target = None
        if self.max_tiles is not None:
            ratio = math.sqrt(h * w / (self.max_tiles * self.grid**2))
            if ratio > 1.1:
                target = (int(h // ratio), int(w // ratio))
        return rows, cols, ys, xs, target

    def _pooled(self) -> int:
        return math.ceil(self.grid / self.video_stride)

    def num_tokens(self, size: tuple[int, int], mode: Mode, frames: int = 1) -> int:
        """Feature tokens of one media item: an image of (height, width), or `frames` frames."""
        base = self.grid**2
        if mode == "multi":
            return base + 1
        if mode == "video":
            p = self._pooled()
            per_frame = {"one_token": p * p, "grid": p * (p + 1), "frame": p * p + 1}
            return frames * per_frame.get(self.video_newline, p * p) + (
                self.video_newline == "one_token"
            )
        _, _, ys, xs, target = self._layout(size)
        h, w = target or (ys.stop - ys.start, xs.stop - xs.start)
        return base + h * (w + 1)


class Anyres(nn.Module):
    """OneVision's image layout with its learned `image_newline` (LLaVA-NeXT `spatial_unpad`).

    - `image` (the only image of its sample): a base view (the image squashed to one tile)
      then the tiles of the best grid from `grid_pinpoints`. The tiles' features are joined
      into one grid, unpadded to the image's aspect, shrunk bilinearly when they hold more than
      `max_tiles` tiles' worth of tokens (`anyres_max_N`), and a newline closes every row;
      the base's tokens come first.
    - `multi` (one of several images): one view padded to a square, its tokens and a newline.
    - `video`: every frame's feature grid is pooled bilinearly by `video_stride` (27² → 14²),
      newlines placed as `video_newline` says.
    """

    def __init__(
        self,
        hidden_size: int,
        tile_size: int,
        grid: int,
        grid_pinpoints: str | list[list[int]] = "(1x1),...,(6x6)",
        max_tiles: int | None = 9,
        video_stride: int = 2,
        video_newline: VideoNewline = "one_token",
    ):
        """
        Args:
            hidden_size: width of the LLM embeddings (of the newline).
            tile_size: side of a tile in pixels (the vision tower's image size).
            grid: side of one tile's feature grid (tokens per tile = grid²).
            grid_pinpoints: candidate resolutions: tile grids `"(1x1),...,(6x6)"` or a list of
                [height, width] pixel pairs (the `image_grid_pinpoints` of a config.json).
            max_tiles: `anyres_max_N`: shrink the tiles' grid to about N tiles of tokens when
                larger; None never shrinks (LLaVA-NeXT 1.6 `anyres`).
            video_stride: pooling stride of video frame grids (1 = no pooling).
            video_newline: `one_token` (transformers), `grid` (LLaVA-NeXT training default:
                a newline per row of every frame), `frame` or `no_token`.
        """
        super().__init__()
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None, got {max_tiles}")
        if video_stride < 1:
            raise ValueError(f"video_stride must be >= 1, got {video_stride}")
        if video_newline not in ("one_token", "grid", "frame", "no_token"):
            raise ValueError(
                f"video_newline must be one_token, grid, frame or no_token, got {video_newline!r}"
            )
        self.layout = AnyresLayout(
            tile_size,
            grid,
            tuple(parse_pinpoints(grid_pinpoints, tile_size)),
            max_tiles,
            video_stride,
            video_newline,
        )
        self.tile_size, self.grid, self.pinpoints = tile_size, grid, self.layout.pinpoints
        self.max_tiles = max_tiles
        self.video_stride, self.video_newline = video_stride, video_newline
        # LLaVA-NeXT and transformers draw it as randn / sqrt(width)
        self.image_newline = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))

    def num_views(self, size: tuple[int, int], mode: Mode) -> int:
        return self.layout.num_views(size, mode)

    def num_tokens(self, size: tuple[int, int], mode: Mode, frames: int = 1) -> int:
        return self.layout.num_tokens(size, mode, frames)

    # --- layout ------------------------------------------------------------------------------
    def forward(self, features: Tensor, size: tuple[int, int], mode: Mode) -> Tensor:
        """`[V, grid², D]` features of one item's views (or frames) → its tokens `[N, D]`."""
        v, t, d = features.shape
        if t != self.grid**2:
            raise ValueError(
                f"anyres expects {self.grid}x{self.grid} = {self.grid**2} tokens per view, got {t}"
            )
        newline = self.image_newline.to(features.dtype)
        if mode == "video":
            return self._video(features, newline)
        expected = self.num_views(size, mode)
        if v != expected:
            raise ValueError(
                f"a {mode} item of size {tuple(size)} has {v} views but the layout expects "
                f"{expected}; were its pixels made by this model's media_spec()?"
            )
        if mode == "multi":
            return torch.cat([features[0], newline[None]])
        rows, cols, ys, xs, target = self.layout._layout(size)
        g = self.grid
        tiles = features[1:].view(rows, cols, g, g, d).permute(4, 0, 2, 1, 3)
        x = tiles.reshape(d, rows * g, cols * g)[:, ys, xs]  # [D, h, w]
        if target is not None:
            x = nn.functional.interpolate(x[None], list(target), mode="bilinear")[0]
        x = torch.cat([x, newline[:, None, None].expand(d, x.shape[1], 1)], dim=2)
        return torch.cat([features[0], x.flatten(1, 2).transpose(0, 1)])

    def _video(self, frames: Tensor, newline: Tensor) -> Tensor:  # [F, g², D] -> [N, D]
        f, _, d = frames.shape
        g = self.grid
        x = frames.view(f, g, g, d).permute(0, 3, 1, 2)  # [F, D, g, g]
        if self.video_stride > 1:
            p = self.layout._pooled()
            x = nn.functional.interpolate(x, size=[p, p], mode="bilinear")
        p = x.shape[-1]
        if self.video_newline == "grid":  # [F, D, p, p+1]: a newline after every row
            x = torch.cat([x, newline[None, :, None, None].expand(f, d, p, 1)], dim=3)
        x = x.permute(0, 2, 3, 1).reshape(f, -1, d)  # [F, tokens per frame, D]
        if self.video_newline == "frame":
            x = torch.cat([x, newline[None, None].expand(f, 1, d)], dim=1)
        x = x.reshape(-1, d)
        if self.video_newline == "one_token":
            x = torch.cat([x, newline[None]])
        return x
