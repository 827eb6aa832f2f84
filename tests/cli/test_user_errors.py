"""A user's mistakes end in one short paragraph and exit code 2, never a traceback; `--debug`
shows the traceback. Each mistake runs as the user types it (a subprocess of `lmm`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmm.cli import main
from tests.helpers import tiny_llava_args

REPO = Path(__file__).parents[2]
TINY = REPO / "recipes" / "tiny" / "llava_synthetic.yaml"
SCORE = REPO / "recipes" / "tiny" / "score_synthetic.yaml"


def _lmm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("LMM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lmm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=180,
    )


@pytest.fixture(scope="module")
def setup(tiny_assets, synthetic_data, tmp_path_factory):
    """A 2-step checkpoint of the tiny recipe, and the arguments that point it at its data."""
    out = tmp_path_factory.mktemp("run")
    data = [
        f"--data.init_args.{split}={synthetic_data / f'{split}.json'}"
        for split in ("train", "val", "test")
    ]
    args = [*tiny_llava_args(tiny_assets), "--trainer.enable_progress_bar=false", *data]
    main(
        [
            "fit",
            f"--config={TINY}",
            *args,
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    [ckpt] = list(out.rglob("last.ckpt"))
    return ckpt, args, out


def _mistakes(setup, synthetic_data, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (the command, what its message must name)."""
    ckpt, args, out = setup
    bad_image = tmp / "bad_image.json"
    record = json.loads((synthetic_data / "train.json").read_text())[0]
    record["images"] = ["images/no_such.png"]
    bad_image.write_text(json.dumps([record]))
    (tmp / "images").mkdir(exist_ok=True)
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    mix = tmp / "mix.yaml"
    mix.write_text(
        f"datasets:\n  - json_path: {synthetic_data / 'train.json'}\n"
        "    sampling_stategy: first:10\n"
    )
    fit = ["fit", f"--config={TINY}", *args, f"--trainer.default_root_dir={tmp}"]
    fit += [f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.max_steps=1"]
    return {
        "missing train file": (
            [*fit, "--data.init_args.train=data/nowhere.json"],
            ["data.init_args.train", "data/nowhere.json"],
        ),
        "wrong image path": (
            [*fit, f"--data.init_args.train={bad_image}"],
            [str(bad_image), "no_such.png"],
        ),
        "missing benchmark file": (
            ["test", f"--config={TINY}", f"--config={REPO / 'recipes/eval/pope.yaml'}", *args],
            ["pope", "llava_pope_test.jsonl"],
        ),
        "checkpoint of another recipe": (
            ["validate", f"--config={SCORE}", *args, f"--ckpt_path={ckpt}"],
            ["llava", "objective.head"],
        ),
        "bad recipe key": ([*fit, "--trainer.max_stepz=3"], ["--trainer.max_stepz", "max_steps"]),
        "missing recipe": (["fit", "--config=recipes/nope.yaml"], ["nope.yaml"]),
        "truncated checkpoint": (
            ["validate", f"--config={TINY}", *args, f"--ckpt_path={truncated}"],
            [str(truncated)],
        ),
        "mixture typo": (
            [*fit, f"--data.init_args.train={mix}"],
            [str(mix), "sampling_stategy", "sampling_strategy"],
        ),
        "chat with a missing checkpoint": (["chat", str(tmp / "nope.ckpt")], ["nope.ckpt"]),
    }


@pytest.mark.slow
def test_user_errors_are_short(setup, synthetic_data, tmp_path):
    failures = []
    for name, (command, named) in _mistakes(setup, synthetic_data, tmp_path).items():
        run = _lmm(*command, cwd=REPO)
        err = run.stderr
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if run.returncode != 2:
            problems.append(f"exit {run.returncode}")
        if "Traceback" in err:
            problems.append("a traceback")
        if len(lines) > 15:
            problems.append(f"{len(lines)} lines")
        problems += [f"does not name {n!r}" for n in named if n not in err]
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n{err[-2000:]}")
    assert not failures, "\n\n".join(failures)


def test_debug_shows_the_traceback(tmp_path):
    run = _lmm("chat", str(tmp_path / "nope.ckpt"), "--debug", cwd=REPO)
    assert run.returncode == 1 and "Traceback" in run.stderr


def test_help_lists_every_command():
    run = _lmm("--help", cwd=REPO)
    assert run.returncode == 0
    for command in ("fit", "validate", "test", "predict", "chat", "report", "data", "convert"):
        assert f"\n  {command} " in run.stdout, run.stdout


@pytest.mark.slow
def test_quickstart_is_quiet(tiny_assets, synthetic_data, tmp_path):
    """A 3-step `lmm fit` of the quickstart recipe prints no warning (ours or a library's)."""
    data = [
        f"--data.init_args.{split}={synthetic_data / f'{split}.json'}"
        for split in ("train", "val", "test")
    ]
    run = _lmm(
        "fit",
        f"--config={TINY}",
        *tiny_llava_args(tiny_assets),
        *data,
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=3",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    noisy = [line for line in output.splitlines() if "warn" in line.lower()]
    assert not noisy, "\n".join(noisy)
