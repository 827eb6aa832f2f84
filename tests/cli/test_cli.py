"""The `lmm` command: every recipe parses; `lmm fit` / `lmm test` run on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmm.cli import LMMCLI, main
from tests.helpers import tiny_llava_args

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_parses(recipe, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        LMMCLI(
            args=[
                "fit",
                f"--config={recipe}",
                f"--trainer.default_root_dir={tmp_path}",
                "--print_config",
            ]
        )
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lmm.LMMModule" in printed and "trainer:" in printed


def _tiny_args(tiny_assets, synthetic_data, tmp_path) -> list[str]:
    recipe = next(r for r in RECIPES if r.name == "llava_synthetic.yaml")
    return [
        f"--config={recipe}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.init_args.train={synthetic_data / 'train.json'}",
        f"--data.init_args.val={synthetic_data / 'val.json'}",
        f"--data.init_args.test={synthetic_data / 'test.json'}",
        *tiny_llava_args(tiny_assets),
    ]


def test_fit_then_test_from_the_command_line(tiny_assets, synthetic_data, tmp_path):
    args = _tiny_args(tiny_assets, synthetic_data, tmp_path)
    main(
        [
            "fit",
            *args,
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.log_every_n_steps=1",
            "--data.init_args.batch_size=4",
        ]
    )
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "fit should write a checkpoint"
    metrics = (tmp_path / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics and "train/tokens_per_s" in metrics
    cli = LMMCLI(args=[*args, "--trainer.limit_test_batches=1"], run=False)
    [result] = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpts[0]))
    assert 0.0 <= result["test/accuracy"] <= 1.0
    assert len(cli.model.predictions) == 16


def test_override_from_command_line_reaches_the_module(tiny_assets, synthetic_data, tmp_path):
    args = _tiny_args(tiny_assets, synthetic_data, tmp_path)
    overrides = [
        "--model.init_args.freeze=[vision]",
        "--model.init_args.part_lr={connector: 0.01}",
        "--model.init_args.scheduler=null",
    ]
    cli = LMMCLI(args=[*args, *overrides], run=False)
    assert not any(p.requires_grad for p in cli.model.model.vision.parameters())
    opt = cli.model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["connector"] == 0.01 and lrs["llm"] == 0.001 and "vision" not in lrs


def test_synth_writes_data(tmp_path):
    main(["synth", "--out", str(tmp_path), "--train", "10", "--val", "5", "--test", "5"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert len(json.loads((tmp_path / "train.json").read_text())) == 10
    assert "counts" in meta


@pytest.mark.slow
def test_fit_meta_init_on_two_processes(tiny_assets, synthetic_data, tmp_path):
    """`lmm fit` with FSDP2 on 2 CPU processes (Lightning launches rank 1) and
    `fsdp.meta_init`: rank 1 builds on the meta device and trains on rank 0's weights."""
    root = Path(__file__).resolve().parents[2]
    args = _tiny_args(tiny_assets, synthetic_data, tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "lmm.cli",
        "fit",
        *args,
        "--trainer.strategy=fsdp2",  # lmm.training.strategies.FSDP2Strategy
        "--trainer.devices=2",
        "--trainer.precision=32-true",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.batch_size=2",
        "--model.init_args.fsdp.meta_init=true",
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "rank 1 built on the meta device" in out, out[-4000:]
    assert "rank 0 loaded the weights" in out, out[-4000:]
    assert "over 2 ranks" in out, out[-4000:]  # both ranks data-parallel (FSDP2Strategy)
    assert "train/loss" in (tmp_path / "version_0" / "metrics.csv").read_text()


def test_lmm_tiny_defaults_are_the_quickstart_model(tmp_path):
    from lmm.cli import tiny
    from lmm.tiny import QUICKSTART_SIZES

    tiny(["--out", str(tmp_path)])
    llm = json.loads((tmp_path / "llm" / "config.json").read_text())
    vision = json.loads((tmp_path / "vision" / "config.json").read_text())
    vision = vision.get("vision_config", vision)
    built = {
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "vision_hidden": vision["hidden_size"],
        "vision_layers": vision["num_hidden_layers"],
        "llm_hidden": llm["hidden_size"],
        "llm_layers": llm["num_hidden_layers"],
    }
    assert built == QUICKSTART_SIZES


@pytest.mark.slow
def test_wandb_logger_by_one_recipe_line(tiny_assets, synthetic_data, tmp_path, monkeypatch):
    """`trainer.logger: WandbLogger` (offline) logs the run's metrics with no account."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    main(
        [
            "fit",
            f"--config={next(r for r in RECIPES if r.name == 'llava_synthetic.yaml')}",
            *tiny_llava_args(tiny_assets),
            "--trainer.enable_progress_bar=false",
            f"--data.init_args.train={synthetic_data / 'train.json'}",
            f"--data.init_args.val={synthetic_data / 'val.json'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.init_args.offline=true",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.project=lmm-test",
            "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2",
        ]
    )
    import wandb

    wandb.finish()
    [run] = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    records = run.read_bytes()  # the offline run's history, `wandb sync` uploads it
    assert b"train/loss" in records and b"val/loss" in records
