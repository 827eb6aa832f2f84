"""Scatter media features into token embeddings at the media placeholder positions."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


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
    mask = input_ids == media_token_id  # [B, L]
    tokens_per_row = mask.sum(dim=1).tolist()
    n_media = 0 if features is None else features.shape[0]
    if sum(views_per_sample) != n_media:
        raise ValueError(
            f"batch has {n_media} media tensors but rows claim {sum(views_per_sample)}"
        )
    per_media = 0 if features is None else features.shape[1]
    for b, (n_tok, n_img) in enumerate(zip(tokens_per_row, views_per_sample, strict=True)):
        if n_tok != n_img * per_media:
            raise ValueError(
                f"sample {ids[b]!r}: {n_tok} image tokens in the text but {n_img * per_media} image "
                f"features ({n_img} images x {per_media}); the processor and the model disagree on "
                "tokens per image"
            )
    if features is None or n_media == 0:
        return embeds
    flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # [N_media * T, D]
    return embeds.masked_scatter(mask.unsqueeze(-1), flat)
