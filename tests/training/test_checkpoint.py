"""Checkpoints: atomic writes, truncated files, weights-only loading, RNG state, stage init."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lmm.training.callbacks import RngState
from lmm.training.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    init_from_checkpoint,
    load_checkpoint_file,
)
from tests.helpers import tiny_llava


def test_atomic_save_and_truncated_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 4}, path)
    assert io.load_checkpoint(path)["step"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left
    data = path.read_bytes()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.ckpt \(\d+ bytes\).*truncated"):
        load_checkpoint_file(bad)


def test_weights_only_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": object()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint_file(path)


def test_rng_state_round_trips(tiny_assets, tmp_path):
    module = tiny_llava(tiny_assets)
    [rng] = [c for c in module.configure_callbacks() if isinstance(c, RngState)]
    ckpt: dict = {}
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    rng.on_save_checkpoint(None, module, ckpt)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "r.ckpt")
    rng.on_load_checkpoint(None, module, load_checkpoint_file(tmp_path / "r.ckpt"))
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_stage_two_takes_the_stage_one_connector(tiny_assets, tmp_path):
    torch.manual_seed(0)
    stage1 = tiny_llava(tiny_assets)
    with torch.no_grad():
        for p in stage1.model.connector.parameters():
            p.add_(1.0)
        stage1.model.llm.model.lm_head.weight.add_(1.0)  # must NOT be taken
    AtomicCheckpointIO().save_checkpoint({"state_dict": stage1.state_dict()}, tmp_path / "s1.ckpt")
    include = [r"model\.connector\..*"]
    stage2 = tiny_llava(tiny_assets, init_from=str(tmp_path / "s1.ckpt"), init_include=include)
    for (n, a), b in zip(
        stage1.model.connector.state_dict().items(),
        stage2.model.connector.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), n
    assert not torch.equal(
        stage1.model.llm.model.lm_head.weight, stage2.model.llm.model.lm_head.weight
    )
    with pytest.raises(ValueError, match="matches include"):
        init_from_checkpoint(stage2, tmp_path / "s1.ckpt", [r"nothing\..*"])


def test_freeze_by_pattern(tiny_assets):
    module = tiny_llava(
        tiny_assets, freeze=["vision", r"re:model\.llm\.model\.model\.layers\.0\..*"]
    )
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.vision.") for n in frozen)
    llm = {n for n in frozen if n.startswith("model.llm.")}
    assert llm and all(".layers.0." in n for n in llm)
    with pytest.raises(ValueError, match="matches no parameter"):
        tiny_llava(tiny_assets, freeze=["re:nope"])
