"""Scatter media features into token embeddings at the media placeholder positions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def scatter_tokens(
    embeds: Tensor,  # [B, L, D] token embeddings
    input_ids: Tensor,  # [B, L]
    media_token_id: int,
    tokens: Tensor | None,  # [N, D], the media tokens of the batch, rows in order
    tokens_per_row: Sequence[int],  # how many of the N belong to each row
    ids: Sequence[str],  # sample ids, for the error message
    describe: Callable[[int], str],  # row b's media, for the error message: "2 images x 4"
    unit: str,  # what the processor and the model count tokens of: "image", "item"
) -> Tensor:
    """Return `embeds` with row b's placeholder positions replaced, in order, by its media tokens.

    Raises a `ValueError` naming the sample when a row's placeholder count differs from the
    number of its media tokens.
    """
    mask = input_ids == media_token_id  # [B, L]
    placeholders = mask.sum(dim=1).tolist()
    for b, (n_tok, expected) in enumerate(zip(placeholders, tokens_per_row, strict=True)):
        if n_tok != expected:
            raise ValueError(
                f"sample {ids[b]!r}: {n_tok} image tokens in the text but {expected} image "
                f"features ({describe(b)}); the processor and the model disagree on tokens per "
                f"{unit}"
            )
    if tokens is None or tokens.shape[0] == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1), tokens.to(embeds.dtype))


def scatter_media(
    embeds: Tensor,  # [B, L, D] token embeddings
    input_ids: Tensor,  # [B, L]
    media_token_id: int,
    features: Tensor | None,  # [N_media, T, D], all media of the batch in order
    views_per_sample: Sequence[int],  # how many of the N_media belong to each row
    ids: Sequence[str],  # sample ids, for the error message
) -> Tensor:
    """Return `embeds` with row b's placeholder positions replaced, in order, by its media features.

    Raises a `ValueError` naming the sample when a row's placeholder count differs from the
    number of feature tokens of its media.
    """
    n_media = 0 if features is None else features.shape[0]
    if sum(views_per_sample) != n_media:
        raise ValueError(
            f"batch has {n_media} media tensors but rows claim {sum(views_per_sample)}"
        )
    per_media = 0 if features is None else features.shape[1]
    return scatter_tokens(
        embeds,
        input_ids,
        media_token_id,
        None if features is None else features.reshape(-1, features.shape[-1]),
        [n * per_media for n in views_per_sample],
        ids,
        lambda b: f"{views_per_sample[b]} images x {per_media}",
        "image",
    )


def scatter_items(
    embeds: Tensor,  # [B, L, D] token embeddings
    input_ids: Tensor,  # [B, L]
    media_token_id: int,
    items: Sequence[Tensor],  # per media item of the batch, in order: [N_i, D]
    items_per_row: Sequence[int],
    ids: Sequence[str],  # sample ids, for the error message
) -> Tensor:
    """`embeds` with row b's placeholders replaced, in order, by its items' tokens (any lengths).

    Raises a `ValueError` naming the sample when a row's placeholder count differs from the
    token count of its items.
    """
    lengths: list[list[int]] = []  # per row, its items' token counts
    start = 0
    for n_items in items_per_row:
        lengths.append([int(x.shape[0]) for x in items[start : start + n_items]])
        start += n_items
    return scatter_tokens(
        embeds,
        input_ids,
        media_token_id,
        torch.cat(list(items)) if items else None,
        [sum(row) for row in lengths],
        ids,
        lambda b: f"{items_per_row[b]} media items of {lengths[b]} tokens",
        "item",
    )
