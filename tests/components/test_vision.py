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
