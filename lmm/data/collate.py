"""Collation: Features → a padded Batch (right padding for training, left for generation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lmm.data.batch import Batch, Features, media_fields


class PadCollator:
    """Pads token rows to the longest and stacks every image of the batch in row order."""

    def __init__(
        self,
        pad_token_id: int,
        padding_side: Literal["right", "left"] = "right",
        task: str | None = None,
        max_new_tokens: int | None = None,
    ):
        """
        Args:
            pad_token_id: the id pad positions get.
            padding_side: `right` for training, `left` for generation prompts.
            task: the benchmark task the batches belong to (`Batch.task`), if any.
            max_new_tokens: the answer length the task asks for, if any.
        """
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.task = task
        self.max_new_tokens = max_new_tokens

    def __call__(self, features: Sequence[Features]) -> Batch:
        length = max(len(f.input_ids) for f in features)
        n = len(features)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        real = torch.zeros((n, length), dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for b, f in enumerate(features):
            k = len(f.input_ids)
            cols = slice(0, k) if self.padding_side == "right" else slice(length - k, length)
            input_ids[b, cols] = f.input_ids
            labels[b, cols] = f.labels
            real[b, cols] = 1
            mask[b, cols] = 1 if f.attention_mask is None else f.attention_mask
        # positions count every real token, hidden ones (a Features.attention_mask 0) included
        position_ids = (real.cumsum(dim=1) - 1).clamp(min=0)
        targets = [f.target for f in features if f.target is not None]
        if targets and len(targets) != len(features):
            raise ValueError("a batch mixes scored samples (with a target) and chat samples")
        return Batch(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            labels=labels,
            views_per_sample=[f.num_views for f in features],
            ids=[f.id for f in features],
            references=[f.reference for f in features],
            prompts=[f.prompt for f in features],
            meta=[f.meta for f in features],
            targets=torch.stack(targets) if targets else None,
            **media_fields(list(features)),
            task=self.task,
            max_new_tokens=self.max_new_tokens,
            stop_strings=features[0].stop_strings,
        )
