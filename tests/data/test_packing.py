"""Packing: first-fit decreasing, row layout, and parity with padding (loss and every gradient)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmm.data.collate import PadCollator
from lmm.data.formats import load_samples
from lmm.data.packing import PackCollator, block_causal_mask, first_fit_decreasing
from tests.helpers import compiled_llm_layers, per_sample_losses, tiny_data, tiny_llava


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    assert first_fit_decreasing([], 10) == []
    with pytest.raises(ValueError, match="11 tokens"):
        first_fit_decreasing([11], 10)


def test_block_causal_mask():
    mask = block_causal_mask([[2, 1, 1]], 4)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def _features(module, data, n):
    dm = tiny_data(data, module)
    samples = load_samples(data / "train.json")[:n]
    return [dm.processor(s) for s in samples]


def test_pack_collator_layout(tiny_assets, synthetic_data):
    module = tiny_llava(tiny_assets)
    feats = _features(module, synthetic_data, 5)
    lengths = [len(f.input_ids) for f in feats]
    batch = PackCollator(module.tokenizer.pad_token_id, max_tokens=sum(lengths[:3]))(feats)
    rows = first_fit_decreasing(lengths, sum(lengths[:3]))
    assert len(batch) == len(rows) < len(feats)
    for r, row in enumerate(rows):
        assert batch.seq_lens[r][: len(row)] == [lengths[i] for i in row]
        start = 0
        for i in row:  # positions restart, tokens are the sample's, images stay with it
            k = lengths[i]
            assert batch.position_ids[r, start : start + k].tolist() == list(range(k))
            assert torch.equal(batch.input_ids[r, start : start + k], feats[i].input_ids)
            start += k
        assert batch.views_per_sample[r] == sum(feats[i].num_views for i in row)
    order = [i for row in rows for i in row]
    expected_pixels = torch.cat([feats[i].pixel_values for i in order if feats[i].num_views])
    assert torch.equal(batch.pixel_values, expected_pixels)


def _loss_and_grads(module, batch):
    module.zero_grad()
    logits = module(batch)
    per_sample = per_sample_losses(logits, batch.labels, batch.seq_lens)
    trained = (batch.labels[:, 1:] != -100).sum()
    total = sum(x * n for x, n in zip(per_sample, _counts(batch), strict=True)) / trained
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return [float(x.detach()) for x in per_sample], grads


def _counts(batch):
    """Trained tokens of each sample, in the order per_sample_losses returns them."""
    trained = batch.labels != -100
    if batch.seq_lens is None:
        return [int(t.sum()) for t in trained]
    out = []
    for b, lens in enumerate(batch.seq_lens):
        start = 0
        for k in lens:
            n = int(trained[b, start : start + k].sum())
            if n:
                out.append(n)
            start += k
    return out


@pytest.mark.parametrize(
    "attention",
    [
        "sdpa_packed",
        "sdpa_packed/per_sample",
        "sdpa",
        "eager",
        pytest.param("sdpa_packed/compiled", marks=pytest.mark.slow),
    ],
)
def test_packing_parity(tiny_assets, synthetic_data, attention, monkeypatch):
    compiled = attention.endswith("/compiled")  # decoder layers under torch.compile
    if attention.endswith("/per_sample"):  # the path rows of 512+ tokens take
        monkeypatch.setattr("lmm.components.attention.PER_SAMPLE_MIN_LENGTH", 0)
    attention = attention.split("/")[0]
    torch.manual_seed(0)
    module = tiny_llava(tiny_assets).float()
    module.model.llm.model.set_attn_implementation(attention)
    assert module.model.llm.model.config._attn_implementation == attention
    with compiled_llm_layers(module) if compiled else contextlib.nullcontext():
        _assert_packed_equals_padded(module, synthetic_data)


def _assert_packed_equals_padded(module, synthetic_data):
    feats = _features(module, synthetic_data, 10)  # all five tasks: 1-3 images, text lengths vary
    lengths = [len(f.input_ids) for f in feats]
    capacity = max(lengths) * 3
    rows = first_fit_decreasing(lengths, capacity)
    order = [i for row in rows for i in row]
    padded = PadCollator(module.tokenizer.pad_token_id)([feats[i] for i in order])
    packed = PackCollator(module.tokenizer.pad_token_id, capacity)(feats)
    assert len(packed) < len(padded)
    loss_padded, grads_padded = _loss_and_grads(module, padded)
    loss_packed, grads_packed = _loss_and_grads(module, packed)
    assert len(loss_padded) == len(loss_packed) == len(feats)
    torch.testing.assert_close(
        torch.tensor(loss_packed), torch.tensor(loss_padded), rtol=1e-5, atol=0
    )
    assert grads_padded.keys() == grads_packed.keys()
    for part in ("model.vision.", "model.connector.", "model.llm."):
        assert any(n.startswith(part) for n in grads_padded), f"no gradient reached {part}"
    for name, g in grads_padded.items():
        # Attention key biases get an exactly-zero gradient in theory (softmax ignores a
        # constant shift); their float noise (~1e-10) is compared absolutely.
        diff = (grads_packed[name] - g).norm()
        assert diff <= 1e-5 * g.norm() + 1e-8, f"{name}: |diff| {diff:.2e}, |grad| {g.norm():.2e}"


def test_group_by_modality_length():
    import numpy as np

    from lmm.data.stream import group_by_modality_length

    lengths = [5, 50, 7, 60, 6, 55, 8, 40, 9, 45]
    media = [False, True] * 5
    batches = group_by_modality_length(lengths, media, 2, np.random.default_rng(0), megabatch=8)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1, 1]  # the two partial batches last
    for b in batches:  # one modality per batch, longest first within the megabatch
        assert len({media[i] for i in b}) == 1
        assert lengths[b[0]] >= lengths[b[-1]]
    text_batches = [b for b in batches if not media[b[0]]]
    assert sorted(lengths[i] for b in text_batches for i in b) == [5, 6, 7, 8, 9]
