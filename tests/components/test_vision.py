"""HFVisionTower: every trainable parameter is one the features depend on."""

from __future__ import annotations

import re

import pytest
import torch

from lmm.components.vision import HFVisionTower
from lmm.tiny import build_vision


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_unused_vision_parameters_frozen(tmp_path, kind, feature_layer):
    path = build_vision(tmp_path / kind, kind, 16, 8, 32, 3, heads=2, seed=0)
    tower = HFVisionTower(str(path), feature_layer=feature_layer)
    tower(torch.randn(2, 3, 16, 16)).square().sum().backward()
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in tower.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    used = 3 + 1 + feature_layer if feature_layer < 0 else feature_layer
    frozen = set(dict(tower.named_parameters())) - trainable
    layers = {int(m.group(1)) for n in frozen if (m := re.search(r"layers\.(\d+)\.", n))}
    assert layers == set(range(used, 3))


def test_feature_layer_out_of_range(tmp_path):
    path = build_vision(tmp_path / "clip", "clip", 16, 8, 32, 2, heads=2, seed=0)
    with pytest.raises(ValueError, match="feature_layer -4 is out of range"):
        HFVisionTower(str(path), feature_layer=-4)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_cpu_towers_attend_short_bf16_sequences_by_matmuls(tmp_path, kind, monkeypatch):
    """`auto` on the CPU gives the towers `sdpa_short`: in bf16 their (short, unmasked)
    attention runs as `matmul_attention`, as close to the float32 features and gradients as
    sdpa's bf16 is; in float32 it is sdpa itself, bit for bit."""
    from lmm.components import attention

    path = build_vision(tmp_path / kind, kind, 32, 8, 64, 2, heads=2, seed=0)
    short = HFVisionTower(str(path), feature_layer=-1)
    plain = HFVisionTower(str(path), feature_layer=-1, attn_implementation="sdpa")
    assert short.model.config._attn_implementation == attention.SHORT_SDPA
    assert plain.model.config._attn_implementation == "sdpa"
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(short(images), plain(images))  # float32: sdpa's path

    calls = []
    matmul = attention.matmul_attention
    monkeypatch.setattr(
        attention, "matmul_attention", lambda *a, **k: calls.append(1) or matmul(*a, **k)
    )

    def run(tower, bf16: bool):
        x = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = tower(x)
        out.float().square().sum().backward()
        return out.float(), x.grad

    reference = run(plain, bf16=False)
    short_bf16, sdpa_bf16 = run(short, bf16=True), run(plain, bf16=True)
    assert len(calls) == 2  # one per layer, the short tower's only
    for got, base, ref in zip(short_bf16, sdpa_bf16, reference, strict=True):
        error, sdpa_error = (got - ref).abs().max(), (base - ref).abs().max()
        assert 0 < sdpa_error < 0.2 * ref.abs().max()  # bf16 rounding, not a broken reference
        assert error <= 2 * sdpa_error, (error, sdpa_error)
