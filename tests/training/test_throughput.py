"""FLOP counting against torch's FlopCounterMode, and the monitor's logged metrics."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from lmm.components.connectors import MLPConnector
from lmm.components.language import CausalLM
from lmm.components.vision import HFVisionTower
from lmm.data.collate import PadCollator
from lmm.data.formats import load_samples
from lmm.families.llava import LlavaModel, LlavaModule
from lmm.training.throughput import ThroughputMonitor, measure_peak_flops, step_flops
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
    module = LlavaModule(model=model, tokenizer=str(tiny_assets["tokenizer"]), freeze=freeze)
    batch = _batch(module, synthetic_data)
    batch.attention_mask[:] = 1  # count every position, as the counter does (padding included)
    spec = module.media_spec()
    vcfg = module.model.vision.model.config
    llm = module.llm.config
    expected = step_flops(
        module.parts(),
        batch,
        (spec.vision.sequence_length((32, 32)), spec.vision.num_tokens((32, 32))),
        (llm.num_hidden_layers, llm.hidden_size),
        (vcfg.num_hidden_layers, vcfg.hidden_size),
    )
    with FlopCounterMode(display=False) as counter:
        loss, _ = module.loss(batch)
        loss.backward()
    measured = counter.get_total_flops()
    # the analytic count leaves out norms, softmax and activations: within 5%
    assert abs(expected - measured) / measured < 0.05, (expected, measured)


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
