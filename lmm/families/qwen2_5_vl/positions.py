"""Qwen2.5-VL's M-RoPE position ids `[3, B, L]` (temporal, height, width) for padded and packed rows.

Text tokens count up on all three rows alike. A media item's feature tokens (t × h × w merged
patches) sit at `start + (floor(i · interval), row, column)`, and the text after it goes on
from the largest position the item used, plus one. That is the rule Qwen2.5-VL was released
with (transformers 4.49-4.5x `Qwen2_5_VLForConditionalGeneration.get_rope_index`:
`st_idx = llm_pos_ids_list[-1].max() + 1`; vLLM's M-RoPE the same). transformers 5.x goes on
from `start + max(h, w)` instead, which differs only when a video's temporal positions
outrun its spatial ones (then its own `rope_deltas` decode from the larger value anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Grid = tuple[int, int, int]  # (t, h, w) of one media item, in merged LLM tokens


def item_positions(grid: Grid, interval: float, start: int) -> Tensor:  # -> [3, t·h·w]
    """Positions of one media item's tokens, in their (t, h, w) row-major order.

    The temporal index is `floor(i · interval)` in float32, as transformers computes it from
    `tokens_per_second · second_per_grid_t` (a float32 tensor).
    """
    t, h, w = grid
    step = torch.arange(t) * torch.tensor(interval, dtype=torch.float32)
    temporal = step.long()
    tt, hh, ww = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def sample_positions(
    input_ids: Tensor,  # [n] one sample's tokens
    media_token_id: int,
    grids: Sequence[Grid],
    intervals: Sequence[float],
    where: str = "sample",
) -> Tensor:  # -> [3, n]
    """M-RoPE positions of one sample (from 0) whose media items are `grids`, in order."""
    n = input_ids.shape[0]
    out = torch.empty(3, n, dtype=torch.long)
    is_media = (input_ids == media_token_id).tolist()
    items = iter(zip(grids, intervals, strict=True))
    i, pos = 0, 0
    while i < n:
        if not is_media[i]:
            j = i
            while j < n and not is_media[j]:
                j += 1
            out[:, i:j] = torch.arange(pos, pos + j - i)
            pos += j - i
            i = j
            continue
        try:
            grid, interval = next(items)
        except StopIteration:
            raise ValueError(
                f"{where}: more media tokens than its {len(grids)} media items have features; "
                "the processor and the model disagree on tokens per item"
            ) from None
        size = grid[0] * grid[1] * grid[2]
        if i + size > n or not all(is_media[i : i + size]):
            raise ValueError(
                f"{where}: media item {grid} (t, h, w) needs {size} consecutive media tokens "
                f"at position {i}; the processor and the model disagree on tokens per item"
            )
        block = item_positions(grid, interval, pos)
        out[:, i : i + size] = block
        pos = int(block.max()) + 1
        i += size
    if next(items, None) is not None:
        raise ValueError(f"{where}: {len(grids)} media items but fewer media tokens in the text")
    return out


def rope_index(
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor | None,  # [B, L], 1 = real token (padded rows)
    seq_lens: Sequence[Sequence[int]] | None,  # packed rows: the sample lengths of each row
    media_token_id: int,
    grids: Sequence[Grid],  # every media item of the batch, rows' samples in order
    intervals: Sequence[float],
    ids: Sequence[str],
) -> Tensor:  # -> [3, B, L]
    """M-RoPE position ids of a batch; pads get 0.

    Padded rows (left or right): the real tokens of a row (mask 1) are its one sample. Packed
    rows: every sample of `seq_lens` starts again at 0, as its text positions do.
    """
    rows, length = input_ids.shape
    out = torch.zeros(3, rows, length, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    sizes = [g[0] * g[1] * g[2] for g in grids]
    k = 0  # next media item
    for b in range(rows):
        if seq_lens is not None:
            bounds, start = [], 0
            for n in seq_lens[b]:
                bounds.append(torch.arange(start, start + n))
                start += n
        else:
            real = attention_mask[b].cpu().bool() if attention_mask is not None else None
            bounds = [torch.arange(length) if real is None else real.nonzero().flatten()]
        for index in bounds:
            tokens = ids_cpu[b, index]
            n_media = int((tokens == media_token_id).sum())
            first = k
            total = 0
            while total < n_media and k < len(grids):
                total += sizes[k]
                k += 1
            if total != n_media:
                raise ValueError(
                    f"sample {ids[b]!r}: {n_media} media tokens in the text but its media items "
                    f"have {sizes[first:k]} tokens; the processor and the model disagree on "
                    "tokens per item"
                )
            where = f"sample {ids[b]!r}"
            pos = sample_positions(
                tokens, media_token_id, grids[first:k], intervals[first:k], where
            )
            out[:, b, index] = pos
    if k != len(grids):
        raise ValueError(f"batch has {len(grids)} media items but its text has tokens for {k}")
    return out.to(input_ids.device)
