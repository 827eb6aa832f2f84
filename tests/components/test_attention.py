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


@pytest.fixture(
    params=["per_sample", "block_mask", "per_sample_matmul", "grouped_matmul", "block_mask_matmul"]
)
def row_path(request, monkeypatch):
    """Every path of `sdpa_packed`: per-sample calls or padded groups of samples (long rows) or
    the block mask (short), by the sdpa kernel or by `matmul_attention` (chosen for bf16 on the
    CPU; forced here in fp32, where both must give sdpa's result)."""
    minimum = 10_000 if request.param.startswith("block_mask") else 0
    monkeypatch.setattr(attention, "PER_SAMPLE_MIN_LENGTH", minimum)
    monkeypatch.setattr(attention, "GROUP_SAMPLES", request.param.startswith("grouped"))
    matmul = request.param.endswith("matmul")
    monkeypatch.setattr(attention, "_use_matmul", lambda q, n, dropout: matmul)
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
    assert resolve_attention("auto", short=True) == "sdpa_short"
    assert resolve_attention("sdpa", short=True) == "sdpa"
    assert resolve_attention("flash_attention_2", causal_lm=True) == "sdpa_packed"
    assert resolve_attention("eager", causal_lm=True) == "eager"


@pytest.mark.parametrize("per_sample", [True, False])
def test_bf16_on_the_cpu_takes_matmul_attention(monkeypatch, per_sample):
    """bf16 packed rows use `matmul_attention`; the result is sdpa's up to bf16 rounding."""
    monkeypatch.setattr(attention, "PER_SAMPLE_MIN_LENGTH", 0 if per_sample else 10_000)
    monkeypatch.setattr(attention, "GROUP_SAMPLES", False)
    calls = []
    real = attention._MatmulAttention.apply
    monkeypatch.setattr(
        attention._MatmulAttention, "apply", lambda *a: calls.append(a[0].shape) or real(*a)
    )
    torch.manual_seed(0)
    seq_lens = [[40, 1, 70, 33, 1, 1], [1, 90, 44, 6, 1, 1, 1, 1, 1]]
    positions, mask = _packed(seq_lens)
    q32, k32, v32 = (torch.randn(2, h, 146, 16, requires_grad=True) for h in (4, 2, 2))
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
    layer = _Layer(2)
    out, _ = packed_sdpa_attention(layer, q, k, v, None, position_ids=positions)
    ref, _ = sdpa_attention_forward(layer, q32, k32, v32, mask)
    assert out.dtype == torch.bfloat16 and len(calls) == (6 if per_sample else 1)
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out.float() * weight).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (q32, k32, v32))
    for g, r in zip(grads, grads_ref, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r).norm() <= 0.02 * r.norm()


def test_bf16_grouped_samples_equal_one_call_per_sample(monkeypatch):
    """Long bf16 rows attend samples in padded groups (`GroupPlan`): similar lengths share a
    batched call, the result and gradients are the per-sample calls' (bf16 rounding apart)."""
    monkeypatch.setattr(attention, "PER_SAMPLE_MIN_LENGTH", 0)
    torch.manual_seed(0)
    seq_lens = [[60, 58, 1, 57, 30, 29, 1, 1, 8], [1, 90, 44, 40, 6, 1, 1, 1, 1, 1, 59]]
    positions, mask = _packed(seq_lens)
    q32, k32, v32 = (torch.randn(2, h, 245, 16, requires_grad=True) for h in (4, 2, 2))
    weight = torch.randn(2, 245, 4, 16)
    results = {}
    for grouped in (True, False):
        monkeypatch.setattr(attention, "GROUP_SAMPLES", grouped)
        q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
        out, _ = packed_sdpa_attention(_Layer(2), q, k, v, None, position_ids=positions)
        grads = torch.autograd.grad((out.float() * weight).sum(), (q, k, v))
        results[grouped] = (out, *grads)
    for g, r in zip(results[True], results[False], strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r.float()).norm() <= 0.01 * r.float().norm()
    plan = attention._group_plan(segments(positions, 2)[0], 4, torch.device("cpu"))
    assert [(index.numel() // size, size) for index, size, _ in plan.groups] == [
        (3, 60),  # 60, 58, 57: padded pairs within GROUP_PADDING of their own
        (2, 30),
        (1, 8),
        (3, 1),
    ]
    assert len(set(plan.inverse.tolist())) == 245  # every position read back from its own slot


def test_long_samples_and_fp32_keep_the_sdpa_kernel():
    q = torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16)
    assert attention._use_matmul(q, attention.MATMUL_MAX_LENGTH, 0.0)
    assert not attention._use_matmul(q, attention.MATMUL_MAX_LENGTH + 1, 0.0)
    assert not attention._use_matmul(q.float(), 8, 0.0)
    assert not attention._use_matmul(q, 8, 0.1)  # attention dropout: sdpa's


def test_bf16_autocast_takes_matmul_attention(monkeypatch):
    """Under bf16 autocast, float32 queries and keys (rotary embeddings upcast them) are
    attended in bf16 by `matmul_attention`, as autocast's sdpa would."""
    monkeypatch.setattr(attention, "PER_SAMPLE_MIN_LENGTH", 0)
    monkeypatch.setattr(attention, "GROUP_SAMPLES", False)
    calls = []
    real = attention._MatmulAttention.apply
    monkeypatch.setattr(
        attention._MatmulAttention, "apply", lambda *a: calls.append(a[0].dtype) or real(*a)
    )
    torch.manual_seed(0)
    positions, _ = _packed([[9, 7]])
    q, k = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 16, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_sdpa_attention(_Layer(1), q, k, v, None, position_ids=positions)
        ref, _ = packed_sdpa_attention(_Layer(1), q, k, v, _packed([[9, 7]])[1])
    assert calls == [torch.bfloat16] * 2 and out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16


def test_block_mask_from_positions_equals_from_seq_lens():
    """`sdpa_packed` finds the samples from restarting position ids, the collator's
    `seq_lens` name them: both give the same block-diagonal mask."""
    seq_lens = [[5, 1, 7, 3, 1, 1], [1, 9, 4, 1, 1, 1, 1]]
    positions, mask = _packed(seq_lens)
    from_positions = attention.block_causal(attention._starts(positions, 2).cumsum(1))
    assert torch.equal(from_positions, mask)
    assert mask[0, 0, 7, 6] and not mask[0, 0, 6, 5]  # sample 2 starts at 6, sample 1 is 5


def test_short_sdpa_is_sdpa_where_it_does_not_take_matmuls():
    """A mask, causal attention or float32 go to sdpa unchanged (same bits); bf16 unmasked
    attention over short sequences equals sdpa up to bf16 rounding, gradients too."""
    module = _Layer(1)
    module.is_causal = False
    q, k, v = (torch.randn(2, 2, 24, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 24, 24) > 0.3
    mask[..., 0] = True
    for kwargs in ({"attention_mask": mask}, {"attention_mask": None, "is_causal": True}):
        got, _ = attention.short_sdpa_attention(module, q, k, v, **kwargs)
        want, _ = sdpa_attention_forward(module, q, k, v, **kwargs)
        assert torch.equal(got, want)
    got, _ = attention.short_sdpa_attention(module, q, k, v, None)  # float32
    assert torch.equal(got, sdpa_attention_forward(module, q, k, v, None)[0])

    results = []
    for fn in (attention.short_sdpa_attention, sdpa_attention_forward):
        qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = fn(module, qs, ks, vs, None)
        out.float().sum().backward()
        results.append((out.float(), qs.grad, ks.grad, vs.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
