"""`lmm convert`: one command for the published layouts, dispatched to the families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmm
from lmm.cli import main as cli_main
from lmm.convert import family_of, import_checkpoint, load_imported
from lmm.families.registry import layouts
from lmm.training.module import LMMModule
from tests.builders import build_tiny_idefics2


def test_layouts_cover_the_published_checkpoints():
    assert {name: family.name for name, family in layouts().items()} == {
        "mantis": "llava",
        "onevision": "llava",
        "llava_qwen": "llava",
        "mipha": "llava",
        "cheetah": "qformer",
        "idefics2": "idefics2",
        "fuyu": "fuyu",
        "qwen2_5_vl": "qwen2_5_vl",
    }


def test_cli_import_then_lmm_load(tiny_assets, tmp_path):
    """`lmm convert import --layout idefics2` writes a folder that `lmm.load` reads as its family."""
    hf = build_tiny_idefics2(tmp_path / "hf", tiny_assets["tokenizer"])
    out = tmp_path / "out"
    cli_main(["convert", "import", "--layout", "idefics2", "--src", str(hf), "--out", str(out)])
    recipe = out / "lmm.yaml"
    assert family_of(recipe).name == "idefics2"
    model = lmm.load(out, template="lmm.data.templates.Idefics2")
    assert isinstance(model.module, LMMModule)
    reference = load_imported(out)
    for (name, a), (_, b) in zip(
        model.module.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert isinstance(load_imported(out), LMMModule)


def test_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown layout 'llava_next'; known: mantis"):
        import_checkpoint("llava_next", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="needs the frozen LLM's folder: pass --llm"):
        import_checkpoint("cheetah", tmp_path / "cheetah.pth", tmp_path / "out")
    with pytest.raises(ValueError, match="takes no \\['vision_config'\\]"):
        import_checkpoint("fuyu", tmp_path, tmp_path / "out", vision_config="x")
    with pytest.raises(FileNotFoundError, match="no lmm.yaml"):
        load_imported(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  class_path: mypkg.Model\n")
    with pytest.raises(ValueError, match="not an lmm family"):
        family_of(recipe)
    qformer = Path(__file__).parents[2] / "recipes" / "cheetah" / "vicuna.yaml"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # a user's setting, not a bug: exit 2, one line
        cli_main(["convert", "export", "--config", str(qformer), "--out", str(tmp_path / "hf")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "export to transformers exists for the llava, idefics2, fuyu and qwen2_5_vl" in err
