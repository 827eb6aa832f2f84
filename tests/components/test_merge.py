"""Scattering media tokens into placeholder positions: fixed-size media and items of any length."""

from __future__ import annotations

import pytest
import torch

from lmm.components.merge import scatter_items, scatter_media

IMG = 9


def _ids() -> torch.Tensor:
    return torch.tensor([[1, IMG, IMG, 2, 3], [IMG, IMG, IMG, IMG, 4]])


def test_scatter_media_places_features_in_row_order():
    features = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)  # 3 images x 2 tokens
    out = scatter_media(torch.zeros(2, 5, 1), _ids(), IMG, features, [1, 2], ["a", "b"])
    assert out[..., 0].tolist() == [[0, 0, 1, 0, 0], [2, 3, 4, 5, 0]]


def test_scatter_items_places_items_of_any_length():
    items = [
        torch.tensor([[7.0], [8.0]]),
        torch.tensor([[1.0]]),
        torch.tensor([[2.0], [3.0], [4.0]]),
    ]
    out = scatter_items(torch.zeros(2, 5, 1), _ids(), IMG, items, [1, 2], ["a", "b"])
    assert out[..., 0].tolist() == [[0, 7, 8, 0, 0], [1, 2, 3, 4, 0]]


def test_scatter_errors_name_the_sample_and_the_counts():
    features = torch.zeros(3, 2, 1)
    with pytest.raises(ValueError, match=r"^batch has 3 media tensors but rows claim 2$"):
        scatter_media(torch.zeros(2, 5, 1), _ids(), IMG, features, [1, 1], ["a", "b"])
    with pytest.raises(
        ValueError,
        match=r"^sample 'b': 4 image tokens in the text but 2 image features \(1 images x 2\); "
        r"the processor and the model disagree on tokens per image$",
    ):
        scatter_media(torch.zeros(2, 5, 1), _ids(), IMG, features[:2], [1, 1], ["a", "b"])
    items = [torch.zeros(2, 1), torch.zeros(1, 1), torch.zeros(2, 1)]
    with pytest.raises(
        ValueError,
        match=r"^sample 'b': 4 image tokens in the text but 3 image features \(2 media items of "
        r"\[1, 2\] tokens\); the processor and the model disagree on tokens per item$",
    ):
        scatter_items(torch.zeros(2, 5, 1), _ids(), IMG, items, [1, 2], ["a", "b"])
