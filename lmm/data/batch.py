"""Features (one processed sample) and the Batch: the one contract between data and families."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Features:
    """One sample after the processor: token ids, labels and its media tensors."""

    id: str
    input_ids: Tensor  # [L]
    labels: Tensor  # [L], -100 where not trained
    pixel_values: Tensor | None  # [N_views, 3, H, W]: every view (tile, frame) of every item
    reference: str | None = None  # the expected answer, for generation
    meta: dict = field(default_factory=dict)
    target: Tensor | None = None  # [n_labels] scores / label targets of a scored sample
    # One entry per media item (image or video), in order: its original (height, width),
    # how it was shown (`image`, `multi`, `video`) and how many rows of pixel_values it has.
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    media_modes: list[str] = field(default_factory=list)
    views_per_media: list[int] = field(default_factory=list)
    # [L], 0 = a token no later token attends to (a seed's attention-mask quirk); None: all 1
    attention_mask: Tensor | None = None
    stop_strings: tuple[str, ...] = ()  # a prompt's: where its template's answers end
    prompt: str | None = None  # a prompt's templated text, media as `<image>` (records, files)

    @property
    def num_views(self) -> int:
        """Rows of `pixel_values`: views (tiles, frames, sub-images), not media items."""
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


@dataclass
class Batch:
    """A padded batch. All images of the batch are stacked for one vision forward."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L], 1 = real token
    position_ids: Tensor  # [B, L]
    labels: Tensor | None  # [B, L], -100 = not trained
    pixel_values: Tensor | None  # [N_views, 3, H, W], the rows' views in order
    views_per_sample: list[int]  # pixel views (rows of pixel_values) of each row
    ids: list[str]
    references: list[str | None] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    targets: Tensor | None = None  # [B, n_labels] for scored samples (score heads)
    seq_lens: list[list[int]] | None = None  # packed rows: the sample lengths of each row
    stream_position: tuple[int, int] | None = None  # (epoch, batch index) in a TrainStream
    # bad records skipped on the way to this batch: (data file, record id, problem) each
    skipped_records: list[tuple[str, str, str]] = field(default_factory=list)
    # Per media item of the batch, rows' items in order (see Features).
    image_sizes: Tensor | None = None  # [M, 2] original (height, width)
    media_modes: list[str] = field(default_factory=list)
    views_per_media: list[int] = field(default_factory=list)
    # Prompt batches: the benchmark task they belong to (scored by its rule), the answer length
    # it asks for, and the strings that end an answer (the template's).
    task: str | None = None
    max_new_tokens: int | None = None
    stop_strings: tuple[str, ...] = ()
    prompts: list[str | None] = field(default_factory=list)  # their templated text (records)

    @classmethod
    def empty(cls) -> Batch:
        """A batch of no rows: a training step whose every sample was a bad record (skipped)."""
        none = torch.zeros(0, 0, dtype=torch.long)
        return cls(none, none.clone(), none.clone(), none.clone(), None, [], [])

    @property
    def skipped(self) -> int:
        """How many bad records were skipped on the way to this batch."""
        return len(self.skipped_records)

    @property
    def packed(self) -> bool:
        return self.seq_lens is not None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def items_per_row(self) -> list[int]:
        """How many media items each row holds, from its pixel views and each item's views."""
        out, i = [], 0
        views = self.views_per_media
        for b, n in enumerate(self.views_per_sample):
            k, total = 0, 0
            while total < n and i + k < len(views):
                total += views[i + k]
                k += 1
            if total != n:
                raise ValueError(
                    f"sample {self.ids[b]!r}: {n} pixel views but its media items have "
                    f"{list(views[i : i + k])} views; build batches with lmm.data collators"
                )
            out.append(k)
            i += k
        return out

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        for name in (
            "input_ids",
            "attention_mask",
            "position_ids",
            "labels",
            "pixel_values",
            "targets",
            "image_sizes",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def media_fields(features: list[Features]) -> dict:
    """The media Batch fields of features in batch order: their pixel views stacked, and the
    per-media-item fields."""
    pixels = [f.pixel_values for f in features if f.pixel_values is not None]
    sizes = [s for f in features for s in f.image_sizes]
    return {
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_sizes": torch.tensor(sizes, dtype=torch.long) if sizes else None,
        "media_modes": [m for f in features for m in f.media_modes],
        "views_per_media": [v for f in features for v in f.views_per_media],
    }
