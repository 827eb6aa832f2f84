"""Connectors: shapes, token counts and the pixel-shuffle merge."""

from __future__ import annotations

import pytest
import torch

from lmm.components.connectors import LinearConnector, MLPConnector


def test_mlp2x_gelu_is_linear_gelu_linear():
    torch.manual_seed(0)
    c = MLPConnector(8, 16)
    x = torch.randn(2, 4, 8)
    expected = c.linear_2(torch.nn.functional.gelu(c.linear_1(x)))
    torch.testing.assert_close(c(x), expected)
    assert sorted(n for n, _ in c.named_parameters()) == [
        "linear_1.bias",
        "linear_1.weight",
        "linear_2.bias",
        "linear_2.weight",
    ]
    assert LinearConnector(8, 16)(x).shape == (2, 4, 16)


def test_merge_groups_each_block_of_the_grid():
    c = MLPConnector(1, 4, depth=1, merge=2)
    # a 4x4 grid whose token value is its index: the first merged token is block (0,0)
    grid = torch.arange(16.0).reshape(1, 16, 1)
    merged = c._merge(grid)
    assert merged.shape == (1, 4, 4)
    assert merged[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert merged[0, 3].tolist() == [10.0, 11.0, 14.0, 15.0]
    assert c.num_tokens(16) == 4 and c(grid).shape == (1, 4, 4)


def test_merge_needs_a_square_grid():
    with pytest.raises(ValueError, match="17 tokens"):
        MLPConnector(2, 4, merge=2)(torch.zeros(1, 17, 2))
