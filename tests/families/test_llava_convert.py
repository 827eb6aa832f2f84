"""LLaVA checkpoint conversion: export to transformers' Llava; import Mantis, llava_qwen and Mipha."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionModel,
)

from lmm.components.connectors import LinearConnector, MLPConnector
from lmm.convert import load_imported, main
from lmm.data.batch import Batch
from lmm.data.collate import PadCollator
from lmm.data.formats import load_samples
from lmm.data.media import load_image
from lmm.families.llava.convert import (
    export_hf,
    import_checkpoint,
)
from lmm.tiny import build_llm, build_vision
from lmm.training.recipe import module_from_recipe
from tests.helpers import tiny_data, tiny_llava

TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(module, data, n=4) -> Batch:
    dm = tiny_data(data, module)
    samples = load_samples(data / "train.json")[:n]
    return PadCollator(module.tokenizer.pad_token_id)([dm.processor(s) for s in samples])


# --- export ---------------------------------------------------------------------------------


def test_export_hf_logits(tiny_assets, synthetic_data, tmp_path):
    torch.manual_seed(0)
    module = tiny_llava(tiny_assets).eval()
    out = export_hf(module, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.image_token_index == module.image_token_id
    assert hf.config.vision_feature_layer == -2
    batch = _batch(module, synthetic_data)
    with torch.no_grad():
        ours = module(batch)
        theirs = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
        ).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], **TOL)
    # the images reach the logits (so the comparison covers the vision path)
    pixels, batch.pixel_values = batch.pixel_values, torch.zeros_like(batch.pixel_values)
    with torch.no_grad():
        assert not torch.allclose(module(batch)[real], ours[real], atol=1e-4)
    batch.pixel_values = pixels

    # the processor loads with plain transformers and expands <image> as we do
    processor = AutoProcessor.from_pretrained(out)
    assert (
        AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>")
        == hf.config.image_token_index
    )
    sample = load_samples(synthetic_data / "train.json")[0]
    image = load_image(sample.images[0])
    enc = processor(text="<image> which shape?", images=[image], return_tensors="pt")
    spec = module.media_spec()
    assert int((enc.input_ids == module.image_token_id).sum()) == spec.num_image_tokens((32, 32))
    torch.testing.assert_close(enc.pixel_values[0], spec.transform(image), rtol=1e-5, atol=1e-5)

    # the folder is in the llava-hf layout (as Mantis'): it imports back to the same model
    back = load_imported(import_checkpoint(out, tmp_path / "back", "mantis").parent).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(batch)[real], ours[real], **TOL)


@pytest.mark.parametrize(
    ("connector", "message"),
    [
        (LinearConnector(64, 64), "LinearConnector"),
        (MLPConnector(64, 64, depth=3), "depth 3"),
        (MLPConnector(64, 64, merge=2), "merge 2"),
    ],
)
def test_export_refuses_what_llava_cannot_express(tiny_assets, tmp_path, connector, message):
    module = tiny_llava(tiny_assets)
    module.model.connector = connector
    with pytest.raises(ValueError, match=message):
        export_hf(module, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_main_export_from_recipe_and_ckpt(tiny_assets, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    model = {
        "class_path": "lmm.LMMModule",
        "init_args": {
            "tokenizer": str(tiny_assets["tokenizer"]),
            "model": {
                "class_path": "lmm.families.llava.LlavaModel",
                "init_args": {
                    "vision": {
                        "class_path": "lmm.components.vision.HFVisionTower",
                        "init_args": {"path": str(tiny_assets["vision"]), "select": "full"},
                    },
                    "llm": {
                        "class_path": "lmm.components.language.CausalLM",
                        "init_args": {"path": str(tiny_assets["llm"])},
                    },
                    "connector": {"class_path": "lmm.components.connectors.MLPConnector"},
                },
            },
        },
    }
    recipe.write_text(yaml.safe_dump({"seed_everything": 0, "model": model, "trainer": {}}))
    module = module_from_recipe(recipe)
    trained = {k: torch.randn_like(v) for k, v in module.model.connector.state_dict().items()}
    module.model.connector.load_state_dict(trained)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "epoch": 1}, ckpt)
    out = main(
        ["export", "--config", str(recipe), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]
    )
    hf = LlavaForConditionalGeneration.from_pretrained(out)
    assert hf.config.vision_feature_select_strategy == "full"
    # the trained connector from the checkpoint, not the recipe's fresh one
    torch.testing.assert_close(
        hf.model.multi_modal_projector.linear_1.weight, trained["linear_1.weight"]
    )


# --- import ---------------------------------------------------------------------------------


def _write_checkpoint(src: Path, state: dict[str, Tensor], config: dict, tokenizer: Path) -> Path:
    """A published-style checkpoint folder: model.safetensors, config.json, tokenizer files."""
    src.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, src / "model.safetensors", {"format": "pt"}
    )
    (src / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(src)
    return src


def _prompt(tokenizer, image_token_id: int, n_tokens: int) -> tuple[list[int], list[int], Tensor]:
    """Text before and after one image, and our input ids with the image expanded to n tokens."""
    pre = tokenizer("USER: ", add_special_tokens=False).input_ids
    post = tokenizer(" which shape is red? ASSISTANT:", add_special_tokens=False).input_ids
    ids = torch.tensor([pre + [image_token_id] * n_tokens + post])
    return pre, post, ids


def _one_image_batch(input_ids: Tensor, pixels: Tensor) -> Batch:
    length = input_ids.shape[1]
    return Batch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        position_ids=torch.arange(length)[None],
        labels=None,
        pixel_values=pixels,
        views_per_sample=[1],
        ids=["probe"],
    )


def _spliced_logits(llm, pre, post, features: Tensor) -> Tensor:  # features [1, T, D]
    """The published models' forward: text embeddings with the image features spliced in."""
    embed = llm.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor([pre])), features, embed(torch.tensor([post]))], dim=1)
    return llm(inputs_embeds=embeds).logits


def _encoder_output(tower: SiglipVisionModel, pixels: Tensor, layers: int) -> Tensor:
    """Hidden state after the first `layers` encoder layers (before post_layernorm), by hand."""
    h = tower.embeddings(pixels)
    for layer in tower.encoder.layers[:layers]:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    return h


def _check_imported(out: Path, batch: Batch, reference: Tensor) -> None:
    module = load_imported(out).eval()
    with torch.no_grad():
        ours = module(batch)
        torch.testing.assert_close(ours[..., : reference.shape[-1]], reference, **TOL)
        batch.pixel_values = torch.zeros_like(batch.pixel_values)
        blank = module(batch)
    assert not torch.allclose(blank, ours, atol=1e-4), "the image must change the logits"


def test_import_mantis(tiny_assets, synthetic_data, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    config = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(tiny_assets["vision"]),
        text_config=AutoConfig.from_pretrained(tiny_assets["llm"]),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(1)
    source = LlavaForConditionalGeneration(config).eval()
    renames = [  # transformers 5 names → Mantis' published (transformers 4.4x) names
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    state = {}
    for key, value in source.state_dict().items():
        old, new = next((o, n) for o, n in renames if key.startswith(o))
        state[new + key[len(old) :]] = value
    assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in state
    src = _write_checkpoint(tmp_path / "mantis", state, config.to_dict(), tiny_assets["tokenizer"])
    (src / "preprocessor_config.json").write_text(json.dumps({"do_center_crop": True}))

    recipe = import_checkpoint(src, tmp_path / "out", "mantis")
    spec = yaml.safe_load(recipe.read_text())["model"]["init_args"]["model"]["init_args"]
    assert spec["vision"]["init_args"]["feature_layer"] == -2
    assert spec["image_aspect"] == "crop"

    # the reference: transformers reads the same folder (its legacy-llava key mapping)
    reference_model = LlavaForConditionalGeneration.from_pretrained(src).eval()
    module = load_imported(tmp_path / "out").eval()
    batch = _batch(module, synthetic_data)
    with torch.no_grad():
        reference = reference_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
        ).logits
        ours = module(batch)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], reference[real], **TOL)
    with torch.no_grad():  # and the reference really is the source model
        direct = source(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
    torch.testing.assert_close(reference[0, :5], direct[0, :5], **TOL)


def _tiny_parts(tmp_path: Path, tiny_assets, llm_type: str, seed: int):
    """A 3-layer SigLIP tower, an mlp2x_gelu projector and a tiny LLM, seeded."""
    tower = SiglipVisionModel.from_pretrained(
        build_vision(tmp_path / "siglip", "siglip", layers=3, seed=seed)
    ).eval()
    llm_dir = build_llm(tmp_path / "llm", tiny_assets["tokenizer"], llm_type, seed=seed)
    torch.manual_seed(seed)
    projector = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    return tower, llm_dir, projector


@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")
def test_import_llava_qwen(tiny_assets, tmp_path):
    tower, llm_dir, projector = _tiny_parts(tmp_path, tiny_assets, "qwen2", seed=2)
    llm_config = AutoConfig.from_pretrained(llm_dir)
    llm_config.rope_parameters["rope_theta"] = 1_000_000.0  # Qwen2.5's, not the default
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, config=llm_config).eval()
    text = llm_config.to_dict()
    del text["rope_parameters"]  # published LLaVA-NeXT configs (transformers 4.4x) say:
    text |= {"rope_theta": 1_000_000.0, "rope_scaling": None}
    newline = torch.randn(64)
    # LLaVA-NeXT deletes the last SigLIP layer and the head before saving
    state = {
        f"model.vision_tower.vision_tower.vision_model.{k}": v
        for k, v in tower.state_dict().items()
        if not k.startswith(("head.", "encoder.layers.2."))
    }
    state |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    state["model.image_newline"] = newline
    state |= {f"model.{k}": v for k, v in llm.model.state_dict().items()}
    state["lm_head.weight"] = llm.lm_head.weight
    config = {
        **text,
        "model_type": "llava_qwen",
        "architectures": ["LlavaQwenForCausalLM"],
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 64,
        "mm_vision_select_layer": -2,  # unused by LLaVA-NeXT's SigLIP tower
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_4",
        "image_grid_pinpoints": [[32, 32], [32, 64]],
    }
    src = _write_checkpoint(tmp_path / "mammoth", state, config, tiny_assets["tokenizer"])

    # offline, the tower named in mm_vision_tower cannot be read: unknown names need a config
    unknown = {**config, "mm_vision_tower": "nobody/tiny-siglip"}
    (src / "config.json").write_text(json.dumps(unknown))
    with pytest.raises(ValueError, match="--vision-config"):
        import_checkpoint(src, tmp_path / "bad", "llava_qwen")
    (src / "config.json").write_text(json.dumps(config))

    out = tmp_path / "out"
    import_checkpoint(src, out, "llava_qwen", vision_config=tmp_path / "siglip")
    assert AutoConfig.from_pretrained(out / "vision").num_hidden_layers == 2
    assert AutoConfig.from_pretrained(out / "llm").rope_parameters["rope_theta"] == 1_000_000.0
    torch.testing.assert_close(
        load_file(out / "weights.safetensors")["model.anyres.image_newline"], newline
    )

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    pre, post, ids = _prompt(tok, tok.convert_tokens_to_ids("<image>"), 16)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # hidden_states[-1] of the 2 layers LLaVA-NeXT keeps, all 16 tokens
        features = projector(_encoder_output(tower, pixels, layers=2))
        reference = _spliced_logits(llm, pre, post, features)
    _check_imported(out, _one_image_batch(ids, pixels), reference)


def test_import_mipha(tiny_assets, tmp_path):
    tower, llm_dir, projector = _tiny_parts(tmp_path, tiny_assets, "phi", seed=3)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    with torch.no_grad():
        llm.lm_head.bias.normal_()  # Phi's lm_head bias: must be imported too
    state = {f"model.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    state |= {f"model.{k}": v for k, v in llm.model.state_dict().items()}
    state |= {f"lm_head.{k}": v for k, v in llm.lm_head.state_dict().items()}
    assert "lm_head.bias" in state
    vision = {
        **tower.config.to_dict(),
        "model_type": "mipha_vision_model",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
    }
    projector_cfg = {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 64, "hidden_size": 64}
    config = {
        **AutoConfig.from_pretrained(llm_dir).to_dict(),
        "model_type": "mipha_phi",
        "architectures": ["MiphaPhiForCausalLM"],
        "vision_config": {"vision_tower": vision, "mm_projector": projector_cfg},
    }
    src = _write_checkpoint(tmp_path / "mipha", state, config, tiny_assets["tokenizer"])

    out = tmp_path / "out"
    recipe = main(["import", "--layout", "mipha", "--src", str(src), "--out", str(out)])
    spec = yaml.safe_load(recipe.read_text())["model"]["init_args"]["model"]["init_args"]
    assert spec["vision"]["init_args"] | {"path": None} == {
        "path": None,
        "feature_layer": -2,
        "select": "full",  # Mipha's SigLIP keeps every token
        "dtype": "float32",
    }

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    pre, post, ids = _prompt(tok, tok.convert_tokens_to_ids("<image>"), 16)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # hidden_states[-2] of the 3-layer tower: after layer 2
        features = projector(_encoder_output(tower, pixels, layers=2))
        reference = _spliced_logits(llm, pre, post, features)
    _check_imported(out, _one_image_batch(ids, pixels), reference)


def test_import_rejects_a_wrong_layout(tiny_assets, tmp_path):
    state = {
        "model.vision_tower.vision_model.x": torch.zeros(1),
        "transformer.h.0.w": torch.zeros(1),
    }
    src = _write_checkpoint(
        tmp_path / "src", state, {"vision_config": {}}, tiny_assets["tokenizer"]
    )
    with pytest.raises(ValueError, match=r"keys fit no part of the layout.*transformer\.h\.0\.w"):
        import_checkpoint(src, tmp_path / "out", "mipha")
