"""Cheetah import: a tiny model written in Cheetah's LAVIS `.pth` layout imports with its logits."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from lmm.cli import LMMCLI
from lmm.components.connectors import LinearConnector
from lmm.components.language import CausalLM
from lmm.components.qformer import Blip2VisionTower, QFormer
from lmm.convert import load_imported
from lmm.data.collate import PadCollator
from lmm.data.formats import load_samples
from lmm.data.templates import CheetahLlama2
from lmm.families.qformer import QFormerModel
from lmm.families.qformer.convert import import_checkpoint
from lmm.tiny import build_tiny_blip2
from lmm.training.module import LMMModule
from tests.helpers import tiny_data

TOL = dict(rtol=1e-5, atol=1e-5)
QUERIES = 8


@pytest.fixture(scope="module")
def blip2(tiny_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blip2")
    return build_tiny_blip2(out, tiny_assets["llm"], tiny_assets["tokenizer"], QUERIES)


@pytest.fixture(scope="module")
def source(tiny_assets, blip2) -> LMMModule:
    """A tiny Cheetah: every weight random (VPG-C off zero), the ViT without key biases as EVA's."""
    model = QFormerModel(
        vision=Blip2VisionTower(str(blip2)),
        qformer=QFormer(str(blip2)),
        llm=CausalLM(str(tiny_assets["llm"])),
        connector=LinearConnector,
        vpgc=True,
        update_layer=1,
    )
    module = LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"])).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for part in (model.vision, model.qformer, model.connector, model.vpgc):
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for layer in model.vision.model.encoder.layers:
            bias = layer.self_attn.qkv.bias
            bias[bias.shape[0] // 3 : 2 * bias.shape[0] // 3] = 0  # EVA: q and v biases only
    return module


# --- the published layout, written by hand (LAVIS / Cheetah names) ----------------------------


def lavis_vision(module: LMMModule) -> dict[str, torch.Tensor]:
    """`visual_encoder.*` + `ln_vision.*` of LAVIS's EVA ViT from the transformers BLIP-2 tower."""
    sd = module.model.vision.model.state_dict()
    out = {
        "visual_encoder.cls_token": sd.pop("embeddings.class_embedding"),
        "visual_encoder.pos_embed": sd.pop("embeddings.position_embedding"),
        "visual_encoder.patch_embed.proj.weight": sd.pop("embeddings.patch_embedding.weight"),
        "visual_encoder.patch_embed.proj.bias": sd.pop("embeddings.patch_embedding.bias"),
        "ln_vision.weight": sd.pop("post_layernorm.weight"),
        "ln_vision.bias": sd.pop("post_layernorm.bias"),
    }
    for i in range(2):
        ours, theirs = f"encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        for a, b in [
            ("layer_norm1", "norm1"),
            ("layer_norm2", "norm2"),
            ("self_attn.projection", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            for w in ("weight", "bias"):
                out[f"{theirs}{b}.{w}"] = sd.pop(f"{ours}{a}.{w}")
        out[f"{theirs}attn.qkv.weight"] = sd.pop(f"{ours}self_attn.qkv.weight")
        q, k, v = sd.pop(f"{ours}self_attn.qkv.bias").chunk(3)
        assert not k.any()
        out[f"{theirs}attn.q_bias"], out[f"{theirs}attn.v_bias"] = q, v
    assert not sd, f"unmapped: {sorted(sd)}"
    return out


def lavis_qformer(module: LMMModule) -> dict[str, torch.Tensor]:
    """`Qformer.bert.*` and `query_tokens` of LAVIS's Q-Former (cross-attention every 2 layers)."""
    sd = module.model.qformer.model.state_dict()
    out = {
        "query_tokens": module.model.qformer.query_tokens.detach().clone(),
        "Qformer.bert.embeddings.LayerNorm.weight": sd.pop("layernorm.weight"),
        "Qformer.bert.embeddings.LayerNorm.bias": sd.pop("layernorm.bias"),
    }
    for i in range(2):
        ours, theirs = f"encoder.layer.{i}.", f"Qformer.bert.encoder.layer.{i}."
        pairs = []
        for kind in ["attention", "crossattention"] if i % 2 == 0 else ["attention"]:
            pairs += [
                (f"{kind}.attention.{p}", f"{kind}.self.{p}") for p in ("query", "key", "value")
            ]
            pairs += [(f"{kind}.output.{p}", f"{kind}.output.{p}") for p in ("dense", "LayerNorm")]
        pairs += [("intermediate_query.dense", "intermediate_query.dense")]
        pairs += [(f"output_query.{p}", f"output_query.{p}") for p in ("dense", "LayerNorm")]
        for a, b in pairs:
            for w in ("weight", "bias"):
                out[f"{theirs}{b}.{w}"] = sd.pop(f"{ours}{a}.{w}")
    assert not sd, f"unmapped: {sorted(sd)}"
    return out


def cheetah_own(module: LMMModule) -> dict[str, torch.Tensor]:
    """What Cheetah trains and adds: `llama_proj` and VPG-C inside its LlamaModel."""
    model = module.model
    return {
        "llama_proj.weight": model.connector.linear.weight.detach().clone(),
        "llama_proj.bias": model.connector.linear.bias.detach().clone(),
        "llama_model.model.query_tokens": model.vpgc.query_tokens.detach().clone(),
        "llama_model.model.qformer_proj.weight": model.vpgc.qformer_proj.weight.detach().clone(),
        "llama_model.model.qformer_proj.bias": model.vpgc.qformer_proj.bias.detach().clone(),
        "llama_model.model.llm_proj.weight": model.vpgc.llm_proj.weight.detach().clone(),
        "llama_model.model.llm_proj.bias": model.vpgc.llm_proj.bias.detach().clone(),
    }


def write_whole(module: LMMModule, path: Path) -> dict[str, torch.Tensor]:
    """Cheetah's whole model state dict in one file: ViT, Q-Former (twice), LLM, VPG-C."""
    qformer = lavis_qformer(module)
    state = {**lavis_vision(module), **qformer, **cheetah_own(module)}
    state |= {f"llama_model.model.{k}": v for k, v in qformer.items() if k != "query_tokens"}
    llm = module.model.llm.model.state_dict()
    state |= {f"llama_model.{k}": v for k, v in llm.items()}
    torch.save({"model": state, "epoch": 4}, path)
    return state


def write_split(module: LMMModule, folder: Path) -> dict[str, Path]:
    """The three files Cheetah reads: EVA ViT, BLIP-2 (with its unused parts), Cheetah's own."""
    vision = lavis_vision(module)
    eva = {k.removeprefix("visual_encoder."): v for k, v in vision.items() if "ln_vision" not in k}
    # EVA-CLIP has one block more than BLIP-2 uses, and a final norm: both unused
    eva |= {k.replace("blocks.1.", "blocks.2."): v for k, v in eva.items() if "blocks.1." in k}
    eva |= {"norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)}
    blip2 = {k: v for k, v in vision.items() if k.startswith("ln_vision.")}
    blip2 |= lavis_qformer(module)
    blip2 |= {
        "Qformer.cls.predictions.bias": torch.zeros(10),
        "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(10, 32),
        "Qformer.bert.embeddings.position_ids": torch.arange(10)[None],
        "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(64, 32),
        "Qformer.bert.encoder.layer.1.output.LayerNorm.weight": torch.zeros(32),
        "vision_proj.weight": torch.zeros(4, 32),
        "temp": torch.tensor(0.07),
        "t5_proj.weight": torch.zeros(16, 32),
    }
    paths = {name: folder / f"{name}.pth" for name in ("eva", "blip2", "src")}
    torch.save(eva, paths["eva"])
    torch.save({"model": blip2}, paths["blip2"])
    torch.save({"model": cheetah_own(module)}, paths["src"])
    return paths


def _batch(module, data):
    dm = tiny_data(data, module)
    features = [dm.processor(s) for s in load_samples(data / "train.json")[:4]]
    return PadCollator(module.tokenizer.pad_token_id)(features)


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", ["whole", "split"])
def test_import_cheetah(files, source, tiny_assets, synthetic_data, tmp_path):
    if files == "whole":
        src = tmp_path / "cheetah.pth"
        write_whole(source, src)
        extra = {}
    else:
        paths = write_split(source, tmp_path)
        src, extra = paths["src"], {"blip2": paths["blip2"], "eva": paths["eva"], "eva_layers": 2}
    recipe = import_checkpoint(
        src,
        tmp_path / "out",
        llm=tiny_assets["llm"],
        tokenizer=tiny_assets["tokenizer"],
        template="llama2",
        update_layer=1,
        vision_heads=4,
        qformer_heads=4,
        **extra,
    )
    config = yaml.safe_load(recipe.read_text())
    assert config["data"]["init_args"]["template"] == "lmm.data.templates.CheetahLlama2"
    assert config["model"]["init_args"]["model"]["init_args"]["update_layer"] == 1
    imported = load_imported(tmp_path / "out").eval()
    ours = imported.model
    # the VPG-C and the projection came from the checkpoint, not from their zero start
    assert ours.vpgc.llm_proj.weight.abs().sum() > 0
    assert torch.equal(ours.vpgc.llm_proj.weight, source.model.vpgc.llm_proj.weight)
    assert torch.equal(ours.vpgc.query_tokens, source.model.vpgc.query_tokens)
    assert torch.equal(ours.connector.linear.bias, source.model.connector.linear.bias)
    assert not torch.equal(ours.vpgc.query_tokens, ours.qformer.query_tokens)
    assert ours.qformer.model.config.cross_attention_frequency == 2
    assert ours.vision.model.config.num_hidden_layers == 2  # EVA's extra block dropped
    assert {n for n, p in imported.named_parameters() if p.requires_grad} == {
        f"model.vpgc.{n}" for n, _ in ours.vpgc.named_parameters()
    }
    batch = _batch(source, synthetic_data)
    with torch.no_grad():
        expected, got = source(batch), imported(batch)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)
    if files == "split":  # the recipe also runs as it is written, through the CLI
        cli = LMMCLI(
            args=[
                f"--config={recipe}",
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}",
            ],
            run=False,
        )
        assert isinstance(cli.datamodule.template, CheetahLlama2)
        assert torch.equal(cli.model.model.vpgc.qformer_proj.weight, ours.vpgc.qformer_proj.weight)


def test_import_errors_name_the_keys(source, tiny_assets, tmp_path):
    state = write_whole(source, tmp_path / "whole.pth")
    kwargs = dict(llm=tiny_assets["llm"], update_layer=1, vision_heads=4, qformer_heads=4)

    def run(name: str, model: dict, **overrides):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": model}, path)
        return import_checkpoint(path, tmp_path / name, **{**kwargs, **overrides})

    without = {k: v for k, v in state.items() if k != "llama_model.model.llm_proj.weight"}
    with pytest.raises(
        ValueError, match=r"missing Cheetah's \['llama_model.model.llm_proj.weight'"
    ):
        run("no_vpgc", without)
    with pytest.raises(ValueError, match="1 keys are not part of .*llama_model.model.mystery"):
        run("mystery", {**state, "llama_model.model.mystery.weight": torch.zeros(2)})
    vision_less = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    with pytest.raises(ValueError, match=r"missing the ViT \(visual_encoder.\*\); pass blip2="):
        run("no_vit", vision_less)
    key = "Qformer.bert.encoder.layer.1.output_query.dense.bias"
    twice = {**state, f"llama_model.model.{key}": state[key] + 1}
    with pytest.raises(ValueError, match=f"llama_model.model.{key} differs from {key}"):
        run("twice", twice)
    no_fc2 = {k: v for k, v in state.items() if k != "visual_encoder.blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"1 missing \['encoder.layers.1.mlp.fc2.bias'\]"):
        run("no_fc2", no_fc2)
    with pytest.raises(ValueError, match="vision_heads=5 does not divide the width 32"):
        run("heads", state, vision_heads=5)
    # an LLM of another width
    wide = {**state, "llama_proj.weight": torch.zeros(48, 32)}
    with pytest.raises(ValueError, match=r"llama_proj.weight \(48, 32\) \(expected \(64, 32\)\)"):
        run("wide", wide)
    # a pickle with objects in it is refused, not run
    bad = tmp_path / "objects.pth"
    torch.save({"model": state, "config": argparse.Namespace(lr=1)}, bad)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        import_checkpoint(bad, tmp_path / "bad", **kwargs)
