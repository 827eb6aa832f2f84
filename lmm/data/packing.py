"""Packing: several samples per row, each isolated by its own positions and a block-diagonal mask.

A packed row holds whole samples back to back; position ids restart at 0 for each sample,
labels at each sample's first token are -100 (so no sample predicts the next one's start),
and `Batch.seq_lens` records the sample lengths of every row. The family builds a
block-diagonal causal mask from them for sdpa/eager, or hands flash-attn 2 the restarting
position ids (varlen). Each sample's images stay with it, in row order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmm.components.attention import block_causal
from lmm.data.batch import Batch, Features, media_fields


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most `capacity`, longest items placed first.

    Within a bin, indices keep the order they were placed in (longest first). An item longer
    than `capacity` raises: it cannot be packed (the processor truncates at `max_length`).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"item {i} has {lengths[i]} tokens, more than the row size {capacity}")
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


class PackCollator:
    """Packs Features into rows of at most `max_tokens` tokens (first-fit decreasing).

    The rows are right-padded to the longest row. A row's padding gets position 0 and its
    own one-token "sample" in `seq_lens`, so it attends only to itself.
    """

    def __init__(self, pad_token_id: int, max_tokens: int):
        self.pad_token_id = pad_token_id
        self.max_tokens = max_tokens

    def __call__(self, features: Sequence[Features]) -> Batch:
        rows = first_fit_decreasing([len(f.input_ids) for f in features], self.max_tokens)
        return self.collate_rows([[features[i] for i in row] for row in rows])

    def collate_rows(self, rows: Sequence[Sequence[Features]]) -> Batch:
        """A Batch of the given rows, each a list of samples in order."""
        length = max(sum(len(f.input_ids) for f in row) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        positions = torch.zeros((n, length), dtype=torch.long)
        seq_lens: list[list[int]] = []
        ordered: list[Features] = []
        for r, row in enumerate(rows):
            start, lens = 0, []
            for f in row:
                if f.attention_mask is not None:
                    raise ValueError(
                        f"sample {f.id!r} has tokens hidden from attention "
                        "(preprocessing.mask_tokens), which packed rows cannot carry; "
                        "set data.init_args.pack_tokens: null to pad instead"
                    )
                k = len(f.input_ids)
                input_ids[r, start : start + k] = f.input_ids
                labels[r, start : start + k] = f.labels
                labels[r, start] = -100  # never predict the next sample's first token
                mask[r, start : start + k] = 1
                positions[r, start : start + k] = torch.arange(k)
                lens.append(k)
                start += k
            lens += [1] * (length - start)  # each pad token is alone
            seq_lens.append(lens)
            ordered += row
        return Batch(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            labels=labels,
            views_per_sample=[sum(f.num_views for f in row) for row in rows],
            ids=["+".join(f.id for f in row) for row in rows],
            references=[None] * n,
            meta=[{"samples": [f.id for f in row]} for row in rows],
            seq_lens=seq_lens,
            **media_fields(ordered),
        )


def block_causal_mask(seq_lens: Sequence[Sequence[int]], length: int, device=None) -> Tensor:
    """`[B, 1, L, L]` bool mask, True where a query may attend: causal within each sample only."""
    sample = torch.stack(
        [
            torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:length]
            for lens in seq_lens
        ]
    ).to(device)  # [B, L]: which sample each position belongs to
    return block_causal(sample)
