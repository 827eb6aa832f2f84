"""`sdpa_packed`: per-sample causal attention for packed rows equals sdpa under the block mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmm.components import attention
from lmm.components.attention import packed_sdpa_attention, resolve_attention, segments
from lmm.data.packing import block_causal_mask


class _Layer(nn.Module):
    """What the attention functions read from a transformers attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = groups


def _packed(seq_lens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids restarting per sample (pads: 0 each) and the block-diagonal causal mask."""
    length = sum(seq_lens[0])
    positions = torch.tensor(
        [[p for n in lens for p in range(n)] for lens in seq_lens], dtype=torch.long
    )
    return positions, block_causal_mask(seq_lens, length)


@pytest.fixture(params=["per_sample", "block_mask"])
def row_path(request, monkeypatch):
    """Both paths of `sdpa_packed`: per-sample calls (long rows) and the block mask (short)."""
    minimum = 0 if request.param == "per_sample" else 10_000
    monkeypatch.setattr(attention, "PER_SAMPLE_MIN_LENGTH", minimum)
    return request.param


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_packed_sdpa_equals_block_mask(heads, kv_heads, row_path):
    torch.manual_seed(0)
    seq_lens = [[5, 1, 7, 3, 1, 1], [1, 9, 4, 1, 1, 1, 1]]  # one-token samples and pad runs
    positions, mask = _packed(seq_lens)
    q = torch.randn(2, heads, 18, 8, requires_grad=True)
    k = torch.randn(2, kv_heads, 18, 8, requires_grad=True)
    v = torch.randn(2, kv_heads, 18, 8, requires_grad=True)
    layer = _Layer(heads // kv_heads)
    out, _ = packed_sdpa_attention(layer, q, k, v, None, scaling=0.3, position_ids=positions)
    ref, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.3)
    assert out.shape == ref.shape == (2, 18, heads, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_packed_sdpa_sliding_window(row_path):
    torch.manual_seed(0)
    positions, mask = _packed([[6, 10]])
    offset = torch.arange(16)[:, None] - torch.arange(16)[None, :]
    windowed = mask & (offset < 4)  # the window of transformers: q - k < sliding_window
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    layer = _Layer(1)
    out, _ = packed_sdpa_attention(layer, q, k, v, None, position_ids=positions, sliding_window=4)
    ref, _ = sdpa_attention_forward(layer, q, k, v, windowed)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_packed_sdpa_with_a_mask_is_sdpa():
    """A padding mask (padded batches, generation) goes to transformers' sdpa untouched."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # left padding
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    layer = _Layer(1)
    out, _ = packed_sdpa_attention(layer, q, k, v, mask, position_ids=positions)
    ref, _ = sdpa_attention_forward(layer, q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_segments():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    assert segments(positions, 2) == [[(0, 3), (3, 5), (5, 6), (6, 7)], [(0, 7)]]


def test_resolve_attention_on_cpu():
    assert resolve_attention("auto", causal_lm=True) == "sdpa_packed"
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("flash_attention_2", causal_lm=True) == "sdpa_packed"
    assert resolve_attention("eager", causal_lm=True) == "eager"
