"""FLOP counting against torch's FlopCounterMode, and the monitor's logged metrics."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmm.components.connectors import MLPConnector
from lmm.components.language import CausalLM
from lmm.components.qformer import Blip2VisionTower, QFormer
from lmm.components.vision import HFVisionTower
from lmm.data.collate import PadCollator
from lmm.data.formats import load_samples
from lmm.families.llava import LlavaModel
from lmm.families.model import FamilyModel
from lmm.families.qformer import QFormerModel
from lmm.tiny import build_tiny_blip2
from lmm.training.module import LMMModule
from lmm.training.throughput import (
    ThroughputMonitor,
    measure_peak_flops,
    measure_sustained_flops,
)
from tests.helpers import quiet_trainer, tiny_data, tiny_llava


def _batch(module, data, n=6):
    dm = tiny_data(data, module)
    return PadCollator(module.tokenizer.pad_token_id)(
        [dm.processor(s) for s in load_samples(data / "train.json")[:n]]
    )


@pytest.mark.parametrize("freeze", [[], ["vision"]])
def test_step_flops_match_the_flop_counter(tiny_assets, synthetic_data, freeze):
    # eager attention: torch's counter sees its matmuls (it does not count sdpa on the CPU)
    model = LlavaModel(
        HFVisionTower(str(tiny_assets["vision"]), feature_layer=-1, attn_implementation="eager"),
        CausalLM(str(tiny_assets["llm"]), attn_implementation="eager"),
        MLPConnector,
    )
    module = LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"]), freeze=freeze)
    batch = _batch(module, synthetic_data)
    batch.attention_mask[:] = 1  # count every position, as the counter does (padding included)
    vision = module.model.vision
    assert module.model.vision_tokens() == (
        vision.sequence_length((32, 32)),
        vision.num_tokens((32, 32)),
    )
    head = module.objective.head_tokens(module, batch)  # the loss's logits: trained positions
    expected = module.model.step_flops(batch, head)
    assert ThroughputMonitor.batch_flops(module, batch) == expected
    with FlopCounterMode(display=False) as counter:
        loss, _ = module.loss(batch)
        loss.backward()
    measured = counter.get_total_flops()
    # the analytic count leaves out norms, softmax and activations: within 5%
    assert abs(expected - measured) / measured < 0.05, (expected, measured)


@pytest.fixture(scope="module")
def blip2(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("blip2")
    return build_tiny_blip2(out, tiny_assets["llm"], tiny_assets["tokenizer"], queries=8)


@pytest.mark.parametrize(
    ("vpgc", "freeze"),
    [(True, None), (False, None), (True, [])],
    ids=["cheetah_vpgc_only", "blip2_qformer_and_projection", "everything"],
)
def test_qformer_step_flops_match_the_flop_counter(
    tiny_assets, synthetic_data, blip2, vpgc, freeze
):
    # eager attention everywhere: torch's counter does not count sdpa on the CPU
    model = QFormerModel(
        Blip2VisionTower(str(blip2), attn_implementation="eager"),
        QFormer(str(blip2), attn_implementation="eager"),
        CausalLM(str(tiny_assets["llm"]), attn_implementation="eager"),
        vpgc=vpgc,
        update_layer=1,
    )
    module = LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"]), freeze=freeze)
    if vpgc:  # VPG-C's output projection starts at zero; the count must not depend on it
        torch.nn.init.normal_(module.model.vpgc.llm_proj.weight, std=0.02)
    batch = _batch(module, synthetic_data, n=4)
    batch.attention_mask[:] = 1  # count every position, as the counter does (padding included)
    # 32 px / patch 8: the Q-Former cross-attends to 16 patches + CLS
    assert model.vision_tokens()[0] == 17
    head = module.objective.head_tokens(module, batch)  # the loss's logits: trained positions
    expected = model.step_flops(batch, head)
    assert ThroughputMonitor.batch_flops(module, batch) == expected
    with FlopCounterMode(display=False) as counter:
        loss, _ = module.loss(batch)
        loss.backward()
    measured = counter.get_total_flops()
    # the analytic count leaves out norms, softmax and activations: within 0.5%
    assert abs(expected - measured) / measured < 0.005, (expected, measured)
    if vpgc and freeze is None:
        # LLaVA's count (no Q-Former, no VPG-C, the LLM's backward all the way down) is far off
        llava = FamilyModel.step_flops(model, batch, head)
        assert abs(llava - measured) / measured > 0.1, (llava, measured)


def test_monitor_logs_mfu(tiny_assets, synthetic_data, tmp_path):
    module = tiny_llava(tiny_assets)
    dm = tiny_data(synthetic_data, batch_size=4)
    monitor = ThroughputMonitor(peak_flops=1e12, log_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, 4, [monitor])
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert 0 < float(m["perf/mfu"]) < 1
    assert float(m["perf/tokens_per_s"]) > 0 and float(m["perf/samples_per_s"]) > 0
    assert 0 <= float(m["perf/data_wait_share"]) < 1
    assert measure_peak_flops(size=256, repeats=2) > 1e8


def test_recomputed_flops_match_the_flop_counter(tiny_assets, synthetic_data):
    # with activation checkpointing the backward runs each decoder layer's forward again: the
    # count of step + recomputation (HFU's numerator) is what torch's counter sees
    model = LlavaModel(
        HFVisionTower(str(tiny_assets["vision"]), feature_layer=-1, attn_implementation="eager"),
        CausalLM(str(tiny_assets["llm"]), attn_implementation="eager"),
        MLPConnector,
    )
    module = LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"]))
    batch = _batch(module, synthetic_data)
    batch.attention_mask[:] = 1
    assert ThroughputMonitor.batch_recomputed_flops(module, batch) == 0
    model.llm.model.gradient_checkpointing_enable({"use_reentrant": False})
    recomputed = ThroughputMonitor.batch_recomputed_flops(module, batch)
    expected = ThroughputMonitor.batch_flops(module, batch) + recomputed
    with FlopCounterMode(display=False) as counter:
        loss, _ = module.loss(batch)
        loss.backward()
    measured = counter.get_total_flops()
    base = ThroughputMonitor.batch_flops(module, batch)
    assert recomputed > 0.1 * measured, (base, recomputed, measured)
    assert abs(expected - measured) / measured < 0.05, (base, recomputed, measured)


def test_monitor_measures_the_peak_around_each_window(tiny_assets, synthetic_data, tmp_path):
    module = tiny_llava(tiny_assets)
    dm = tiny_data(synthetic_data, batch_size=4)
    monitor = ThroughputMonitor(log_every_n_steps=2, peak_budget=None)
    trainer = quiet_trainer(tmp_path, 4, [monitor])
    trainer.fit(module, datamodule=dm)
    assert monitor.measurements == 3  # before the first step, after each of the 2 windows
    m = trainer.callback_metrics
    # the model's own GEMMs (tokens x in x out) are among the measured shapes
    llm_mlp = module.model.llm.model.config.intermediate_size
    assert any(n == llm_mlp or k == llm_mlp for _, k, n in monitor.shapes)
    assert 0 <= float(m["perf/mfu_peak_spread"]) < 1
    # the window's peak is the larger of before / after (logged as float32)
    assert float(m["perf/peak_flops"]) >= monitor.peak_flops * (1 - 1e-6)
    assert float(m["perf/hfu"]) == pytest.approx(float(m["perf/mfu"]))  # no checkpointing
    assert 0 < float(m["perf/mfu"]) < 1


def test_peak_is_the_best_shape():
    square = measure_peak_flops(size=64, repeats=2)
    best = measure_peak_flops(size=64, repeats=2, shapes=[(256, 256, 256)])
    assert best > square  # a 64² matmul is far from what 256³ reaches


def test_sustained_flops_run_the_shapes_for_the_time_asked():
    start = time.perf_counter()
    rate = measure_sustained_flops([(64, 32, 48), (16, 48, 32)], seconds=0.2)
    assert time.perf_counter() - start >= 0.2
    assert rate > 1e6
    with pytest.raises(ValueError, match="at least one"):
        measure_sustained_flops([], seconds=0.1)


def test_monitor_keeps_measuring_within_its_budget(tiny_assets, synthetic_data, tmp_path):
    """By default the peak is measured again only while measuring has taken < 1% of the fit;
    a window that is not measured divides by the last peak and logs no spread."""
    module = tiny_llava(tiny_assets)
    monitor = ThroughputMonitor(log_every_n_steps=1, peak_budget=0.0)
    trainer = quiet_trainer(tmp_path, 3, [monitor])
    trainer.fit(module, datamodule=tiny_data(synthetic_data, batch_size=4))
    assert monitor.measurements == 1  # before the first step only
    m = trainer.callback_metrics
    assert float(m["perf/peak_flops"]) == pytest.approx(monitor.peak_flops, rel=1e-6)
    assert "perf/mfu_peak_spread" not in m
    assert ThroughputMonitor().peak_budget == 0.01  # what recipes get
    with pytest.raises(ValueError, match="peak_budget"):
        ThroughputMonitor(peak_budget=-1)
