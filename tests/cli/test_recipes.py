"""Seed recipes run: each family's recipe trains 2 steps with tiny models and data swapped in."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmm.cli import LMMCLI
from lmm.tiny import build_llm, build_vision
from lmm.training.throughput import ThroughputMonitor
from tests.helpers import cpu_fit_args

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "vision_type", "llm_type", "pack"),
    [
        ("mantis/stage2_siglip.yaml", "siglip", "llama", "256"),
        ("mantis/stage2_clip_qlora.yaml", "clip", "llama", "256"),
        # Mipha hides every terminator from attention (preprocessing.mask_tokens): padded rows
        ("mipha/3b_stage2.yaml", "siglip", "phi", "null"),
    ],
)
def test_seed_recipe_trains_two_steps(
    recipe, vision_type, llm_type, pack, tiny_assets, synthetic_data, tmp_path
):
    vision = build_vision(tmp_path / "vision", vision_type, image_size=32, patch_size=8)
    llm = build_llm(tmp_path / "llm", tiny_assets["tokenizer"], llm_type)
    cli = LMMCLI(
        args=[
            "fit",
            f"--config={RECIPES / recipe}",
            *cpu_fit_args(tmp_path),
            f"--model.init_args.tokenizer={tiny_assets['tokenizer']}",
            f"--model.init_args.model.init_args.vision.init_args.path={vision}",
            "--model.init_args.model.init_args.vision.init_args.dtype=float32",
            f"--model.init_args.model.init_args.llm.init_args.path={llm}",
            "--model.init_args.model.init_args.llm.init_args.dtype=float32",
            "--model.init_args.init_from=null",
            f"--data.init_args.train={synthetic_data / 'train.json'}",
            "--data.init_args.batch_size=2",
            "--data.init_args.max_length=256",
            f"--data.init_args.pack_tokens={pack}",
            "--data.init_args.num_workers=0",
        ]
    )
    assert cli.trainer.global_step == 2
    [monitor] = [c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor)]
    assert monitor.peak_flops > 0 and monitor._acc["flops"] > 0


def test_each_stage_reads_the_checkpoint_its_previous_stage_writes():
    """A stage's `init_from: runs/X/last.ckpt` is where a recipe's ModelCheckpoint writes."""
    import yaml

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*/*.yaml"))
    written, read = set(), {}
    for recipe in recipes:
        config = yaml.safe_load(recipe.read_text())
        for callback in (config.get("trainer") or {}).get("callbacks") or []:
            if callback["class_path"].endswith("ModelCheckpoint"):
                dirpath = (callback.get("init_args") or {}).get("dirpath")
                if dirpath:
                    written.add(f"{dirpath}/last.ckpt")
        init_from = (config.get("model") or {}).get("init_args", {}).get("init_from")
        if isinstance(init_from, str) and init_from.startswith("runs/"):
            read[recipe.name] = init_from
    assert read, "no stage reads a previous stage's checkpoint"
    unmatched = {name: path for name, path in read.items() if path not in written}
    assert not unmatched, unmatched
