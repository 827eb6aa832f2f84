"""LoRA / DoRA / QLoRA (lmm.training.lora): targets, what trains, adapter save/load, merge."""

from __future__ import annotations

import itertools
import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from lmm.components.connectors import MLPConnector
from lmm.components.language import CausalLM
from lmm.components.vision import HFVisionTower
from lmm.families.llava import LlavaModel
from lmm.training.lora import (
    LoraConfig,
    apply_lora,
    has_lora,
    load_adapter,
    lora_targets,
    merge_lora,
    quantization_kwargs,
    save_adapter,
    trainable_counts,
)
from lmm.training.module import LMMModule
from tests.helpers import tiny_data

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MANTIS_TARGETS = [
    f"llm.model.model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"
    for i in range(2)
    for p in PROJ
]


def _llava(assets, cfg: LoraConfig | None = None) -> LMMModule:
    """The tiny LLaVA of tests.helpers, with the LLM loaded as `cfg` quantizes it."""
    torch.manual_seed(0)
    llm = CausalLM(str(assets["llm"]), quantization=quantization_kwargs(cfg) if cfg else None)
    model = LlavaModel(
        vision=HFVisionTower(str(assets["vision"]), feature_layer=-2),
        llm=llm,
        connector=MLPConnector,
    )
    return LMMModule(model=model, tokenizer=str(assets["tokenizer"]))


def _batches(module, data, batch_size=8):
    """Training batches of the resumable stream, epoch after epoch."""
    dm = tiny_data(data, module, batch_size=batch_size)
    stream = dm.train_stream()
    for epoch in itertools.count():
        stream.epoch, stream.start = epoch, 0
        yield from stream


def _train(module, batches, steps, lr=2e-3) -> list[float]:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    module.train()
    losses = []
    for batch in itertools.islice(batches, steps):
        loss, _ = module.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _logits(module, batch):
    module.eval()
    return module(batch)


def _lora_params(module, layer: int, kind: str = "lora_B"):
    return {n: p for n, p in module.named_parameters() if f"layers.{layer}." in n and kind in n}


def test_mantis_default_targets_every_llm_linear_but_lm_head(tiny_assets, synthetic_data):
    module = _llava(tiny_assets)
    batch = next(_batches(module, synthetic_data))
    base = _logits(module, batch)
    cfg = LoraConfig(r=8, alpha=16)
    assert lora_targets(module, cfg) == MANTIS_TARGETS
    assert apply_lora(module, cfg) == MANTIS_TARGETS
    # trainable: the adapters (A and B of each target) and the connector, nothing else
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert len(lora) == 2 * len(MANTIS_TARGETS)
    assert all(n.startswith("model.llm.model.model.layers.") for n in lora)
    assert trainable - lora == {
        n for n, _ in module.model.connector.named_parameters(prefix="model.connector")
    }
    hidden, inner = 64, 256
    per_layer = 4 * 8 * (hidden + hidden) + 3 * 8 * (hidden + inner)  # r (in + out) per target
    connector = sum(p.numel() for p in module.model.connector.parameters())
    assert trainable_counts(module) == {"lora": 2 * per_layer, "connector": connector}
    # in place: the LLM keeps its transformers class and layout; keys only gain base_layer / lora_*
    assert isinstance(module.model.llm.model, LlamaForCausalLM)
    keys = set(module.state_dict())
    assert "model.llm.model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.llm.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "model.llm.model.lm_head.weight" in keys
    # B starts at zero: the adapted model computes exactly what the base did
    assert torch.equal(_logits(module, batch), base)


def test_idefics2_style_regex_and_connector_targets(tiny_assets):
    module = _llava(tiny_assets)
    # Mantis's Idefics2 recipe (r 8, alpha 8, dropout 0.1, gaussian), regex written for our names
    cfg = LoraConfig(
        r=8, alpha=8, dropout=0.1, init="gaussian", target=r".*(llm|connector).*(q|v)_proj.*$"
    )
    targets = apply_lora(module, cfg)
    assert targets == [t for t in MANTIS_TARGETS if t.endswith(("q_proj", "v_proj"))]
    q = module.model.llm.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == 1.0  # alpha / r
    assert q.lora_dropout["default"].p == 0.1
    assert 0.09 < q.lora_A["default"].weight.std().item() < 0.16  # gaussian init: std 1/r

    # a pattern may adapt the connector too; then it cannot also be trained in full
    cfg = LoraConfig(r=4, alpha=8, target=r"connector\.linear_\d|llm.*\.o_proj", train_parts=[])
    other = _llava(tiny_assets)
    assert apply_lora(other, cfg) == [
        "connector.linear_1",
        "connector.linear_2",
        "llm.model.model.layers.0.self_attn.o_proj",
        "llm.model.model.layers.1.self_attn.o_proj",
    ]
    assert trainable_counts(other) == {"lora": 4 * (64 + 64) * 4}
    with pytest.raises(ValueError, match=r"\['connector'\] are in lora.train_parts"):
        apply_lora(_llava(tiny_assets), LoraConfig(target=r"connector\.linear_\d"))


def test_lora_config_errors(tiny_assets):
    module = _llava(tiny_assets)
    with pytest.raises(ValueError, match=r"matches no linear layer.*llm\.model\.model\.layers"):
        apply_lora(module, LoraConfig(target=r"text_model\..*"))
    with pytest.raises(ValueError, match=r"quantize is 'nf4'.*quantization_kwargs"):
        apply_lora(module, LoraConfig(quantize="nf4"))
    with pytest.raises(ValueError, match=r"unknown parts \['projector'\]"):
        apply_lora(module, LoraConfig(train_parts=["projector"]))
    assert not has_lora(module)
    apply_lora(module, LoraConfig(r=4))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(module, LoraConfig(r=4))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_train_save_load_merge_float(tiny_assets, synthetic_data, tmp_path, dora):
    module = _llava(tiny_assets)
    cfg = LoraConfig(r=8, alpha=16, dora=dora)
    apply_lora(module, cfg)
    if dora:  # one magnitude per output channel of each target, trained too
        mags = {n for n, p in module.named_parameters() if "magnitude" in n and p.requires_grad}
        assert len(mags) == len(MANTIS_TARGETS)
    q_base = (
        module.model.llm.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    )
    batches = _batches(module, synthetic_data)
    losses = _train(module, batches, 6)
    assert losses[-1] < losses[0]
    batch = next(batches)
    trained = _logits(module, batch)

    save_adapter(module, tmp_path / "adapter")
    fresh = _llava(tiny_assets)
    load_adapter(fresh, tmp_path / "adapter")  # applies LoRA from the saved config
    assert fresh.lora_config == cfg
    assert torch.equal(_logits(fresh, batch), trained)
    prompts = next(iter(tiny_data(synthetic_data, module, eval_batch_size=4).test_dataloader()))
    assert fresh.generate(prompts, max_new_tokens=4) == module.generate(prompts, max_new_tokens=4)

    merge_lora(module)
    assert not has_lora(module)
    q = module.model.llm.model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and not torch.equal(q.weight, q_base)
    assert not any("lora_" in k or "base_layer" in k for k in module.state_dict())
    torch.testing.assert_close(_logits(module, batch), trained, rtol=0, atol=1e-5)


def test_qlora_cpu(tiny_assets, synthetic_data, tmp_path):
    """4-bit nf4 (double quant) base + LoRA: learns, survives an eval pass, saves, merges."""
    import bitsandbytes as bnb

    cfg = LoraConfig(r=8, alpha=16, quantize="nf4", compute_dtype="float32")
    module = _llava(tiny_assets, cfg)
    q = module.model.llm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested
    assert apply_lora(module, cfg) == MANTIS_TARGETS
    assert set(trainable_counts(module)) == {"lora", "connector"}

    batches = _batches(module, synthetic_data)
    losses = _train(module, batches, 10)
    # a validation-style pass (eval, no grad) must not freeze the 4-bit layers' backward
    _logits(module, next(batches))
    losses += _train(module, batches, 10)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    grads = [p.grad for p in _lora_params(module, 0).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    batch = next(batches)
    trained = _logits(module, batch)
    out = save_adapter(module, tmp_path / "adapter")
    assert set(load_file(out / "non_lora_trainables.safetensors")) == {
        f"connector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")
    }
    assert json.loads((out / "lora_config.json").read_text())["targets"] == MANTIS_TARGETS
    fresh = _llava(tiny_assets, cfg)
    load_adapter(fresh, out)
    assert torch.equal(_logits(fresh, batch), trained)

    # merging dequantizes the 4-bit base (to float32 here) and folds the adapters in
    merge_lora(module)
    assert not has_lora(module)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    assert getattr(module.model.llm.model, "hf_quantizer", None) is None
    torch.testing.assert_close(_logits(module, batch), trained, rtol=0, atol=1e-5)


def test_qlora_after_an_eval_forward(tiny_assets, synthetic_data):
    """A 4-bit model evaluated before LoRA (bitsandbytes repacked it for CPU) still trains."""
    cfg = LoraConfig(r=8, alpha=16, quantize="nf4", compute_dtype="float32")
    module, reference = _llava(tiny_assets, cfg), _llava(tiny_assets, cfg)
    batches = _batches(module, synthetic_data)
    batch = next(batches)
    _logits(module, batch)
    apply_lora(module, cfg)
    apply_lora(reference, cfg)
    # restored to the training layout (on AVX512-BF16 CPUs the scales were rounded to bf16)
    diff = (_logits(module, batch) - _logits(reference, batch)).abs().max().item()
    assert diff < 1e-2
    _train(module, batches, 2)
    assert all(p.grad.abs().sum() > 0 for p in _lora_params(module, 0).values())


def test_qlora_in_lightning_fit(tiny_assets, synthetic_data, tmp_path):
    """Trainer.fit with a sanity validation pass first: every layer's adapters still learn."""
    cfg = LoraConfig(r=8, alpha=16, quantize="nf4")  # bf16 compute, the QLoRA default
    module = _llava(tiny_assets, cfg)
    apply_lora(module, cfg)
    vision = {k: v.clone() for k, v in module.model.vision.state_dict().items()}
    q_data = module.model.llm.model.model.layers[0].self_attn.q_proj.base_layer.weight.data.clone()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=tiny_data(synthetic_data, module, batch_size=4))
    for layer in (0, 1):
        assert all(p.abs().sum() > 0 for p in _lora_params(module, layer).values())  # B left 0
    assert torch.equal(
        module.model.llm.model.model.layers[0].self_attn.q_proj.base_layer.weight.data, q_data
    )
    assert all(torch.equal(v, module.model.vision.state_dict()[k]) for k, v in vision.items())


def test_int8_base(tiny_assets, synthetic_data):
    """LoRA on an LLM.int8 base trains, and merges into the dequantized weights."""
    cfg = LoraConfig(r=8, alpha=16, quantize="int8")
    module = _llava(tiny_assets, cfg)
    apply_lora(module, cfg)
    batches = _batches(module, synthetic_data)
    losses = _train(module, batches, 4)
    assert losses[-1] < losses[0]
    batch = next(batches)
    trained = _logits(module, batch)
    merge_lora(module)
    # int8 matmuls quantize the activations too: the unmerged forward is itself approximate
    torch.testing.assert_close(_logits(module, batch), trained, rtol=0, atol=2e-2)


def test_lora_config_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--lora", type=LoraConfig)
    cfg = parser.parse_args(["--lora.quantize=nf4", "--lora.train_parts=[]", "--lora.r=8"])
    lora = parser.instantiate_classes(cfg).lora
    assert lora == LoraConfig(r=8, quantize="nf4", train_parts=[])
    assert quantization_kwargs(lora) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    assert "full-matched against" in parser.format_help()  # field docs reach --help


def test_adapter_keeps_the_score_head(tiny_assets, tmp_path):
    """LoRA leaves a score head trainable; the adapter directory saves and restores it."""
    from lmm.training.objectives import Scores

    def build():
        torch.manual_seed(0)
        model = LlavaModel(
            HFVisionTower(str(tiny_assets["vision"])),
            CausalLM(str(tiny_assets["llm"])),
            MLPConnector,
        )
        return LMMModule(
            model=model,
            tokenizer=str(tiny_assets["tokenizer"]),
            objective=Scores(["a", "b"]),
            lora=LoraConfig(r=4, alpha=8),
        )

    module = build()
    head = module.objective.head.proj.weight
    assert head.requires_grad
    with torch.no_grad():
        head.add_(1.0)  # as if trained
    save_adapter(module, tmp_path / "adapter")
    assert {k for k in load_file(tmp_path / "adapter" / "non_lora_trainables.safetensors")} >= {
        "score.proj.weight"
    }
    fresh = build()
    assert not torch.equal(fresh.objective.head.proj.weight, head)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.objective.head.proj.weight, head)
