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
}
# Recipes whose model comes from a local import folder (`lmm convert`, checkpoints/...), not a
# hub id: no shipped facts name them yet. Cheetah's published parts are not comparable at 1%:
# BLIP-2's "Q-Former 188M" counts the BERT embeddings and text heads that Cheetah does not build.
NOT_YET = {
    "mantis/fuyu",
    "mantis/idefics2_qlora",
    "mantis/videoscore",
    "cheetah/vicuna",
    "cheetah/llama2",
}


def _hub_ids(node) -> set[str]:
    """Every `path` / `tokenizer` value of a recipe's model section."""
    if isinstance(node, dict):
        found = {v for k, v in node.items() if k in ("path", "tokenizer") and isinstance(v, str)}
        return found.union(*(_hub_ids(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_hub_ids(v) for v in node))
    return set()


def _seed_recipes() -> dict[str, dict]:
    files = sorted(f for seed in SEEDS for f in (ROOT / "recipes" / seed).glob("*.yaml"))
    return {f"{f.parent.name}/{f.stem}": yaml.safe_load(f.read_text()) for f in files}


def test_plan_every_seed_recipe_is_counted_or_named():
    """A new seed recipe is either compared with a published size or listed with its reason;
    every recipe compared names only hub ids whose published architecture lmm ships."""
    recipes = _seed_recipes()
    assert set(recipes) == set(RECIPES) | NOT_YET
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
