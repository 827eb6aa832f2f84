"""`lmm plan`: seed recipes at full size on the meta device, against published model sizes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from lmm import published
from lmm.plan import meta_module, parameter_counts

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ("mantis", "llava15", "mammoth_vl", "mipha", "llava_phi", "cheetah", "qwen2_5_vl")

# Published sizes. "card": the Hugging Face model card's "Model size" (safetensors count, as
# displayed: 3 significant digits). "parts": the seed ships no merged checkpoint with a card
# figure, so its LLM's card figure plus the vision tower's published size (the connector,
# ~0.3% of these models, is in the prediction only).
SIGLIP_SO400M = 0.428e9  # SoViT-400m/14: Alabdulmohsin et al. 2023, "Getting ViT in Shape", Table 1
CLIP_L14 = 0.304e9  # ViT-L/14 image encoder: Radford et al. 2021 (CLIP), 304M
# Cheetah builds BLIP-2's EVA ViT-g and Q-Former (transformers' Blip2 classes) and no merged
# checkpoint has a card figure: the LLM's card figure plus the published sizes of the parts it
# builds. EVA ViT-g/14: 1011M (Fang et al. 2023, "EVA", Table 1: width 1408, depth 40, MLP 6144);
# BLIP-2 drops its last layer (Li et al. 2023, sec. 3.3), one layer being 4 * 1408^2 + 2 * 1408 *
# 6144 weights, 1408 * 4 + 6144 + 1408 biases, two LayerNorms 4 * 1408. The Q-Former: 188M
# (BLIP-2, sec. 3.1, queries included), less its text branch, which Cheetah (transformers'
# Blip2QFormerModel) does not build: BERT word embeddings (bert-base-uncased's 30522 + BLIP-2's
# [DEC] = 30523 rows) and position embeddings (512 rows) of width 768, and each of the 12 layers'
# text feed-forward (768 -> 3072 -> 768 with biases, and its LayerNorm).
EVA_G_LAYER = 4 * 1408**2 + 2 * 1408 * 6144 + (1408 * 4 + 6144 + 1408) + 4 * 1408
EVA_G_BLIP2 = 1011e6 - EVA_G_LAYER
QFORMER_TEXT = (30523 + 512) * 768 + 12 * (2 * 768 * 3072 + 3072 + 768 + 2 * 768)
QFORMER_CHEETAH = 188e6 - QFORMER_TEXT
PUBLISHED = {
    "Mantis-8B-siglip-llama3": (8.48e9, "card: huggingface.co/TIGER-Lab/Mantis-8B-siglip-llama3"),
    "Mantis-8B-clip-llama3": (8.36e9, "card: huggingface.co/TIGER-Lab/Mantis-8B-clip-llama3"),
    "LLaVA-1.5-7B": (7.06e9, "card: huggingface.co/llava-hf/llava-1.5-7b-hf"),
    "MAmmoTH-VL-8B": (8.03e9, "card: huggingface.co/MAmmoTH-VL/MAmmoTH-VL-8B"),
    "Qwen2.5-VL-3B-Instruct": (3.75e9, "card: huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct"),
    "Mipha-3B": (2.78e9 + SIGLIP_SO400M, "parts: microsoft/phi-2 card 2.78B + SoViT-400m"),
    "Mipha-2.4B": (2.51e9 + SIGLIP_SO400M, "parts: google/gemma-2b card 2.51B + SoViT-400m"),
    "Mipha-1.6B": (1.42e9 + SIGLIP_SO400M, "parts: microsoft/phi-1_5 card 1.42B + SoViT-400m"),
    "LLaVA-Phi": (2.78e9 + CLIP_L14, "parts: microsoft/phi-2 card 2.78B + CLIP ViT-L/14"),
    "Fuyu-8B": (9.41e9, "card: huggingface.co/adept/fuyu-8b"),
    "Idefics2-8B": (8.4e9, "card: huggingface.co/HuggingFaceM4/idefics2-8b"),
    "Mantis-8B-Idefics2": (8.4e9, "card: huggingface.co/TIGER-Lab/Mantis-8B-Idefics2"),
    "Cheetah-LLaMA2-7B": (
        6.74e9 + EVA_G_BLIP2 + QFORMER_CHEETAH,
        "parts: Llama-2-7b-chat card 6.74B + EVA ViT-g 39/40 layers + Q-Former w/o text branch",
    ),
    "Cheetah-Vicuna-7B": (
        6.74e9 + EVA_G_BLIP2 + QFORMER_CHEETAH,
        "parts: huggyllama/llama-7b card 6.74B + EVA ViT-g 39/40 layers + Q-Former w/o text",
    ),
}
RECIPES = {  # recipe -> the published model it builds (its base, without LoRA adapters)
    "mantis/stage1_siglip": "Mantis-8B-siglip-llama3",
    "mantis/stage2_siglip": "Mantis-8B-siglip-llama3",
    "mantis/stage2_siglip_qlora": "Mantis-8B-siglip-llama3",
    "mantis/stage1_clip": "Mantis-8B-clip-llama3",
    "mantis/stage2_clip": "Mantis-8B-clip-llama3",
    "mantis/stage2_clip_qlora": "Mantis-8B-clip-llama3",
    "llava15/pretrain": "LLaVA-1.5-7B",
    "llava15/finetune": "LLaVA-1.5-7B",
    "mammoth_vl/stage1": "MAmmoTH-VL-8B",
    "mammoth_vl/stage2_si": "MAmmoTH-VL-8B",
    "mammoth_vl/stage3_ov": "MAmmoTH-VL-8B",
    "qwen2_5_vl/finetune": "Qwen2.5-VL-3B-Instruct",
    "mipha/3b_stage1": "Mipha-3B",
    "mipha/3b_stage2": "Mipha-3B",
    "mipha/2.4b_stage1": "Mipha-2.4B",
    "mipha/2.4b_stage2": "Mipha-2.4B",
    "mipha/1.6b_stage1": "Mipha-1.6B",
    "mipha/1.6b_stage2": "Mipha-1.6B",
    "llava_phi/stage1": "LLaVA-Phi",
    "llava_phi/stage2": "LLaVA-Phi",
    # from import folders (`lmm convert import`, checkpoints/...): stood in from the facts of
    # the hub checkpoint each is imported from (lmm.published.IMPORTS)
    "mantis/fuyu": "Fuyu-8B",  # Mantis-8B-Fuyu: Fuyu-8B fully fine-tuned, 2 tokens added
    "mantis/idefics2_qlora": "Idefics2-8B",
    "mantis/videoscore": "Mantis-8B-Idefics2",  # + its 5-score head (20K)
    "cheetah/vicuna": "Cheetah-Vicuna-7B",
    "cheetah/llama2": "Cheetah-LLaMA2-7B",
}


def _hub_ids(node) -> set[str]:
    """Every `path` / `tokenizer` value of a recipe's model section, an import folder's as the
    hub id it is imported from (`lmm.published.IMPORTS`)."""
    if isinstance(node, dict):
        found = {v for k, v in node.items() if k in ("path", "tokenizer") and isinstance(v, str)}
        found = {_imported_from(v) for v in found}
        return found.union(*(_hub_ids(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_hub_ids(v) for v in node))
    return set()


def _imported_from(path: str) -> str:
    for folder, (hub_id, _) in published.IMPORTS.items():
        if path == folder or path.startswith(folder + "/"):
            return hub_id
    return path


def _seed_recipes() -> dict[str, dict]:
    files = sorted(f for seed in SEEDS for f in (ROOT / "recipes" / seed).glob("*.yaml"))
    return {f"{f.parent.name}/{f.stem}": yaml.safe_load(f.read_text()) for f in files}


def test_plan_every_seed_recipe_is_counted_or_named():
    """Every seed recipe is compared with a published size and names only hub ids (or import
    folders of hub ids) whose published architecture lmm ships."""
    recipes = _seed_recipes()
    assert set(recipes) == set(RECIPES)
    for name in RECIPES:
        missing = _hub_ids(recipes[name]["model"]) - set(published.shipped())
        assert not missing, f"{name} names {missing}, not shipped in lmm/published"


def test_plan_parameter_counts(capsys):
    """Every seed recipe's full-size parameter count (built on the meta device, offline, with
    no files of its models on disk) within 1% of the published model size."""
    recipes = _seed_recipes()
    built: dict[str, int] = {}  # one build per distinct model section
    rows = []
    for name, model in RECIPES.items():
        config = recipes[name]
        key = yaml.safe_dump(
            {k: config["model"]["init_args"].get(k) for k in ("model", "tokenizer")}
        )
        if key not in built:
            start = time.perf_counter()
            module = meta_module(config, name)
            seconds = time.perf_counter() - start
            assert seconds < 30, f"{name}: the meta build took {seconds:.0f} s"
            assert all(p.is_meta for p in module.parameters()), f"{name}: weights were built"
            counts = parameter_counts(module)["total"]
            built[key] = counts["parameters"] - counts["adapters"]
        figure, source = PUBLISHED[model]
        error = built[key] / figure - 1
        rows.append(
            f"{name:28} {built[key] / 1e9:7.3f}B {figure / 1e9:6.2f}B {error:+.2%}  {source}"
        )
        assert abs(error) < 0.01, rows[-1]
    with capsys.disabled():
        print("\n" + "\n".join(rows))  # noqa: T201 (the table for the report)


def test_plan_counts_parts_and_adapters():
    """The QLoRA recipe's LLM carries adapters on top of the same frozen base as the full
    fine-tune; the frozen vision tower counts as frozen."""
    recipes = _seed_recipes()
    full = parameter_counts(meta_module(recipes["mantis/stage2_siglip"], "full"))
    qlora = parameter_counts(meta_module(recipes["mantis/stage2_siglip_qlora"], "qlora"))
    assert full["llm"]["adapters"] == 0 and qlora["llm"]["adapters"] > 0
    assert qlora["llm"]["parameters"] - qlora["llm"]["adapters"] == full["llm"]["parameters"]
    assert qlora["llm"]["trainable"] == qlora["llm"]["adapters"]
    assert full["vision"]["trainable"] == 0 and full["vision"]["frozen"] > 0


def test_plan_fallback_only_without_files(tmp_path, monkeypatch):
    """A folder on disk is read as it is (the shipped facts never shadow a checkpoint), and
    reading weights of a hub id that is not here stays an error."""
    from transformers import AutoConfig

    from lmm.components.pretrained import empty_init, load_config

    hub_id = "google/gemma-2b"
    with empty_init(every_rank=True, published=True):
        assert load_config(hub_id).num_hidden_layers == 18  # shipped
    with pytest.raises(OSError), empty_init(every_rank=True):
        load_config(hub_id)  # a meta build that tokenizes (lmm data check): no fallback
    with pytest.raises(OSError):
        load_config(hub_id)  # reading weights: no fallback
    shipped = published.config(hub_id)
    shipped.num_hidden_layers = 2
    shipped.save_pretrained(tmp_path / hub_id)
    monkeypatch.chdir(tmp_path)  # a folder named as the hub id: from_pretrained reads it
    with empty_init(every_rank=True, published=True):
        assert load_config(hub_id).num_hidden_layers == 2
    assert isinstance(load_config(hub_id), type(AutoConfig.for_model("gemma")))


@pytest.mark.parametrize(
    ("recipe", "model_class"),
    [
        ("mantis/fuyu", "FuyuForCausalLM"),
        ("mantis/idefics2_qlora", "Idefics2ForConditionalGeneration"),
        ("cheetah/vicuna", "LlamaForCausalLM"),
    ],
)
def test_plan_import_stand_in_matches_transformers(recipe, model_class):
    """A recipe reading an import folder that is not here builds, from the stand-in written in
    its family's import layout, exactly the transformers model of the hub checkpoint it is
    imported from (built from the same shipped facts), plus the rows of the tokens the recipe
    adds; an import folder that is here is read as it is."""
    import torch
    import transformers

    config = _seed_recipes()[recipe]
    module = meta_module(config, recipe)
    counts = parameter_counts(module)
    hub_id = _imported_from(config["model"]["init_args"]["tokenizer"])
    facts = published.facts(hub_id)
    with torch.device("meta"):
        reference = getattr(transformers, model_class)._from_config(published.config(hub_id))
    added_rows = len(module.tokenizer) - facts["tokenizer"]["length"]
    hidden = reference.get_input_embeddings().weight.shape[1]
    parts = {"mantis/fuyu": ("vision", "llm"), "cheetah/vicuna": ("llm",)}.get(
        recipe, ("vision", "connector", "llm")
    )
    built = sum(counts[p]["parameters"] - counts[p]["adapters"] for p in parts)
    assert built - 2 * added_rows * hidden == reference.num_parameters()
    assert added_rows >= 0


def test_plan_import_stand_in_only_without_the_folder(tmp_path, monkeypatch):
    """An import folder on disk is what the build reads; without it, the stand-in."""
    from lmm.plan import _stand_in_imports

    section = {"path": "checkpoints/vicuna-7b-v0", "other": "checkpoints/elsewhere"}
    monkeypatch.chdir(tmp_path)
    stood_in = _stand_in_imports(section, tmp_path / "stand_ins")
    assert stood_in["other"] == "checkpoints/elsewhere"
    assert (Path(stood_in["path"]) / "config.json").is_file()
    (tmp_path / "checkpoints/vicuna-7b-v0").mkdir(parents=True)
    assert _stand_in_imports(section, tmp_path / "again") == section
