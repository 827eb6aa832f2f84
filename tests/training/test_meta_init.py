"""`fsdp.meta_init` pieces that need no process group: which rank loads, meta building, misuse."""

from __future__ import annotations

import pytest

from lmm.components.pretrained import empty_init, launched_rank_zero
from lmm.training.strategies import FSDP2Config, has_meta
from tests.helpers import tiny_llava

LAUNCH_ENV = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),  # a plain process
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),
        ({"RANK": "1", "LOCAL_RANK": "0"}, False),  # torchrun, second node
        ({"SLURM_PROCID": "2"}, False),
        ({"LOCAL_RANK": "1"}, False),  # Lightning's subprocess launcher
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
    ],
)
def test_launched_rank_zero(monkeypatch, env, zero):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_rank_zero() is zero


def test_empty_init_builds_on_meta_only_off_rank_zero(tiny_assets, monkeypatch):
    """Off rank 0 every parameter is on the meta device and no weight file is read."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    with empty_init(True):
        assert not has_meta(tiny_llava(tiny_assets))  # rank 0 loads the weights
    monkeypatch.setenv("RANK", "1")
    with empty_init(False):
        assert not has_meta(tiny_llava(tiny_assets))
    import safetensors

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight file was read on the meta device")

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    monkeypatch.setattr("safetensors.torch.load_file", no_reading)
    monkeypatch.setattr("transformers.modeling_utils.safe_open", no_reading)
    with empty_init(True):
        module = tiny_llava(tiny_assets, fsdp=FSDP2Config(meta_init=True))
        module.model.llm.resize_vocab(
            module.model.llm.model.config.vocab_size + 8
        )  # on meta tensors
    assert all(p.is_meta for p in module.parameters())
    assert (
        module.model.llm.model.get_input_embeddings().num_embeddings
        == module.model.llm.model.config.vocab_size
    )
    rotary = module.model.llm.model.model.rotary_emb.inv_freq  # buffers are computed as usual
    assert not rotary.is_meta and rotary[0] == 1.0
    with pytest.raises(RuntimeError, match="meta_init needs the FSDP2 plan"):
        module.configure_model()  # no ModelParallelStrategy: nothing would give it weights


def test_meta_init_refuses_a_quantized_llm(tiny_assets):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lmm.training.lora import LoraConfig, quantization_kwargs

    lora = LoraConfig(r=4, quantize="nf4", compute_dtype="float32")
    module = tiny_llava(
        tiny_assets, quantization=quantization_kwargs(lora), fsdp=FSDP2Config(meta_init=True)
    )
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    module._trainer = type("Trainer", (), {"strategy": strategy})()
    with pytest.raises(ValueError, match="meta_init cannot broadcast a quantized"):
        module.configure_model()
