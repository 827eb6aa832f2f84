"""The user's path through the commands: a short fit leaves `last.ckpt` (also when SIGTERM or
Ctrl-C stops it), and validate / test / predict / `lmm.load` / export / report run from it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmm.cli import main
from tests.helpers import tiny_data, tiny_llava, tiny_llava_args

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny" / "llava_synthetic.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _args(tiny_assets, data: Path, root: Path) -> list[str]:
    """The quickstart recipe on the tiny model and data, logging to `root`: what a user types,
    with the paths of the test's assets."""
    return [
        f"--config={TINY}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--data.init_args.train={data / 'train.json'}",
        f"--data.init_args.val={data / 'val.json'}",
        f"--data.init_args.test={data / 'test.json'}",
        *tiny_llava_args(tiny_assets),
        "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=4",
    ]


def _ckpts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.ckpt"))


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def _newest(root: Path, name: str) -> Path:
    """`name` in the newest `version_N` folder under `root` that has it."""
    found = sorted(root.glob(f"version_*/{name}"), key=lambda p: int(p.parent.name[8:]))
    assert found, f"no {name} under {root}: {sorted(p.name for p in root.iterdir())}"
    return found[-1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tiny_assets, synthetic_data, tmp_path_factory) -> SimpleNamespace:
    """`lmm fit --trainer.max_steps=3` of the quickstart (validation every 500 steps)."""
    root = tmp_path_factory.mktemp("short_run")
    args = _args(tiny_assets, synthetic_data, root)
    main(["fit", *args, "--trainer.max_steps=3"])
    return SimpleNamespace(root=root, args=args, ckpt=root / "version_0/checkpoints/last.ckpt")


@pytest.fixture(scope="module")
def tested_run(short_run) -> Path:
    """`lmm test` of the short run's last.ckpt on the recipe's own test file: its log folder."""
    main(["test", *short_run.args, f"--ckpt_path={short_run.ckpt}"])
    return _newest(short_run.root, "results.json").parent


def test_short_fit_in_process_leaves_only_last_ckpt(short_run):
    assert _ckpts(short_run.root) == [short_run.ckpt]  # no validation ran: nothing else saved
    assert _step(short_run.ckpt) == 3


# --- lmm predict ------------------------------------------------------------------------------


def test_predict_writes_jsonl(short_run, tested_run, synthetic_data, tmp_path):
    """`lmm predict` without data.predict answers the test file; one record per sample, in
    order, with prompt, prediction, reference and task; the answers equal `lmm test`'s."""
    main(["predict", *short_run.args, f"--ckpt_path={short_run.ckpt}"])
    out = _newest(short_run.root, "predictions.jsonl")
    assert (out.parent / "config.yaml").is_file()  # next to the run's logs
    rows = _rows(out)
    records = json.loads((synthetic_data / "test.json").read_text())
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row, rec in zip(rows, records, strict=True):
        question, answer = rec["conversation"][0]["content"], rec["conversation"][1]["content"]
        assert question in row["prompt"] and row["prompt"].count("<image>") == len(rec["images"])
        assert row["reference"] == answer and row["task"] == rec["task"]
        assert isinstance(row["prediction"], str)
    tested = {r["id"]: r["prediction"] for r in _rows(tested_run / "predictions/test.jsonl")}
    assert {r["id"]: r["prediction"] for r in rows} == tested  # one generation path

    # A predict file of questions without answers: records without a reference.
    questions = [{**rec, "conversation": rec["conversation"][:1]} for rec in records[:3]]
    file = tmp_path / "questions.json"
    file.write_text(json.dumps(questions))
    predict = [f"--data.init_args.predict={file}", f"--data.init_args.root={synthetic_data}"]
    main(["predict", *short_run.args, *predict, f"--ckpt_path={short_run.ckpt}"])
    rows = _rows(_newest(short_run.root, "predictions.jsonl"))
    assert [r["id"] for r in rows] == [q["id"] for q in questions]
    assert all("reference" not in r and r["prediction"] == tested[r["id"]] for r in rows)


def test_predict_without_any_data_file_names_the_setting(short_run):
    args = [a for a in short_run.args if not a.startswith("--data.init_args.test=")]
    with pytest.raises(ValueError, match="neither data.init_args.predict nor data.init_args.test"):
        main(["predict", *args, "--data.init_args.test=null", f"--ckpt_path={short_run.ckpt}"])


# --- lmm test and lmm report ------------------------------------------------------------------


def _accuracy(rows: list[dict], key: str = "correct") -> float:
    return 100 * sum(bool(r[key]) for r in rows) / len(rows)


def test_report_on_any_run(
    short_run, tested_run, tiny_assets, synthetic_data, tmp_path, monkeypatch
):
    """`lmm test` of a recipe without benchmarks writes results.json (exact match, per record
    task) and predictions; the synthetic eval recipe scores the same answers the same; `lmm
    report` reads either run (a bar chart below three tasks)."""
    results = json.loads((tested_run / "results.json").read_text())
    entry = results["tasks"]["test"]
    rows = _rows(tested_run / "predictions/test.jsonl")
    assert entry["samples"] == len(rows) == 16 and entry["headline"] == "accuracy"
    assert entry["file"] == str(synthetic_data / "test.json")
    assert results["checkpoint"] == str(short_run.ckpt)
    for row in rows:
        assert row["correct"] == (row["prediction"].strip().lower() == row["reference"].lower())
    tasks = {r["task"] for r in rows}
    assert set(entry["metrics"]) == {"accuracy", *tasks}
    assert entry["metrics"]["accuracy"] == pytest.approx(_accuracy(rows))
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        assert entry["metrics"][task] == pytest.approx(_accuracy(mine))

    # recipes/eval/synthetic.yaml reads data/synthetic/test.json from the working directory.
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data/synthetic").symlink_to(synthetic_data)
    monkeypatch.chdir(work)
    main(
        [
            "test",
            f"--config={TINY}",
            f"--config={REPO / 'recipes/eval/synthetic.yaml'}",
            *tiny_llava_args(tiny_assets),
            "--trainer.enable_progress_bar=false",
            f"--ckpt_path={short_run.ckpt}",
        ]
    )
    [synthetic_file] = list((work / "runs/eval/synthetic").rglob("results.json"))
    synthetic = json.loads(synthetic_file.read_text())["tasks"]["synthetic"]
    assert synthetic["benchmark"] == "chat" and synthetic["samples"] == 16
    assert synthetic["metrics"] == pytest.approx(entry["metrics"])  # the same rule, same answers
    task_rows = _rows(synthetic_file.parent / "predictions/synthetic.jsonl")
    assert [r["correct"] for r in task_rows] == [r["correct"] for r in rows]

    report = tmp_path / "report"
    text_one = _report([tested_run], report / "one")
    assert "| short_run" in text_one and "| test (accuracy) |" in text_one
    # One model (named after the run folder above the checkpoint), two tasks: one row, bars.
    text = _report([tested_run, synthetic_file], report / "two")
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert header == "| model | synthetic (accuracy) | test (accuracy) |"
    score = f"{entry['score']:.1f}"
    assert f"| {short_run.root.name} | {score} | {score} |" in text


def _report(results: list[Path], out: Path) -> str:
    main(["report", *map(str, results), "--out", str(out)])
    assert (out / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "radar.png").exists()
    return (out / "report.md").read_text()


# --- last.ckpt: a schedule that does not end on a save; Ctrl-C; SIGTERM ------------------------


def test_last_ckpt_after_a_model_checkpoint_schedule(tiny_assets, synthetic_data, tmp_path):
    """A `ModelCheckpoint(save_last=True)` saving every 2 steps of a 3-step run: its step-2 file
    stays, last.ckpt holds step 3 (rewritten at the end, not a second `last-v1`)."""
    module = tiny_llava(tiny_assets)
    data = tiny_data(synthetic_data, batch_size=4)
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    names = sorted(p.name for p in _ckpts(tmp_path))
    assert names == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert (
        _step(tmp_path / "ckpt/epoch=0-step=2.ckpt") == 2
        and _step(tmp_path / "ckpt/last.ckpt") == 3
    )


def _send(*signals: str, at_step: int = 1) -> str:
    return "--trainer.callbacks+=" + json.dumps(
        {
            "class_path": "tests.training.signals.SendSignal",
            "init_args": {"signals": list(signals), "at_step": at_step},
        }
    )


@pytest.fixture
def restore_sigint():
    """Python's own SIGINT handler during the test and after it (Lightning ignores SIGINT
    once it has handled a Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize(("signal_name", "status"), [("SIGINT", 1), ("SIGTERM", 143)])
def test_stop_saves_last_ckpt_that_resumes_exactly(
    signal_name, status, short_run, tiny_assets, synthetic_data, tmp_path, restore_sigint
):
    """Ctrl-C (SIGINT) or SIGTERM after step 1 ends the run there with last.ckpt (exit 1 as
    Lightning's Ctrl-C, or 143); resuming it to step 3 gives the uninterrupted run's weights."""
    args = _args(tiny_assets, synthetic_data, tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["fit", *args, "--trainer.max_steps=3", _send(signal_name)])
    assert stopped.value.code == status
    [ckpt] = _ckpts(tmp_path)
    assert ckpt.name == "last.ckpt" and _step(ckpt) == 1
    main(["fit", *args, "--trainer.max_steps=3", f"--ckpt_path={ckpt}"])
    resumed = tmp_path / "version_1/checkpoints/last.ckpt"
    assert _step(resumed) == 3
    ours = torch.load(resumed, map_location="cpu", weights_only=True)["state_dict"]
    straight = torch.load(short_run.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert ours.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(ours[name], value), name


def test_second_ctrl_c_stops_at_once_without_saving(
    tiny_assets, synthetic_data, tmp_path, restore_sigint
):
    args = _args(tiny_assets, synthetic_data, tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", *args, "--trainer.max_steps=3", _send("SIGINT", "SIGINT")])
    assert _ckpts(tmp_path) == []  # the step may be half done: nothing written


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_that_resumes(tiny_assets, synthetic_data, tmp_path):
    """`kill` of a running `lmm fit` after its first step: exit 143 with last.ckpt, which a
    new `lmm fit --ckpt_path` resumes to the end."""
    args = _args(tiny_assets, synthetic_data, tmp_path)
    announce = "--trainer.callbacks+=tests.training.signals.Announce"
    fit = [sys.executable, "-m", "lmm.cli", "fit", *args, "--trainer.max_steps=1000", announce]
    proc = subprocess.Popen(fit, env=ENV, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("lmm-test step 1"):
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=600)
    err = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: training stopped after step" in err, err[-3000:]
    [ckpt] = _ckpts(tmp_path)
    step = _step(ckpt)
    assert ckpt.name == "last.ckpt" and 1 <= step < 10
    main(["fit", *args, f"--trainer.max_steps={step + 2}", f"--ckpt_path={ckpt}"])
    assert _step(tmp_path / "version_1/checkpoints/last.ckpt") == step + 2


# --- the whole path, as a user types it -------------------------------------------------------


def _lmm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmm.cli", *args]
    return subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)


def _ok(result: subprocess.CompletedProcess) -> str:
    """The output of a command that succeeded without printing a warning."""
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    warned = [line for line in out.splitlines() if re.search(r"\.py:\d+: |warn", line, re.I)]
    assert not warned, "\n".join(warned)
    return out


@pytest.mark.slow
def test_short_fit_leaves_last_ckpt(tiny_assets, synthetic_data, tmp_path):
    """`lmm fit ... --trainer.max_steps=3` of the quickstart leaves last.ckpt, and validate,
    test, predict, `lmm.load(...).generate` and `lmm convert export` all run from it
    (subprocesses); export writes a transformers folder or exits 2 with one line naming what
    transformers cannot express (the quickstart's 2x2 token merge)."""
    args = _args(tiny_assets, synthetic_data, tmp_path)
    _ok(_lmm("fit", *args, "--trainer.max_steps=3", cwd=tmp_path))
    ckpt = tmp_path / "version_0/checkpoints/last.ckpt"
    assert _ckpts(tmp_path) == [ckpt] and _step(ckpt) == 3
    assert "val/loss" in _ok(_lmm("validate", *args, f"--ckpt_path={ckpt}", cwd=tmp_path))
    _ok(_lmm("test", *args, f"--ckpt_path={ckpt}", cwd=tmp_path))
    assert json.loads(_newest(tmp_path, "results.json").read_text())["tasks"]["test"]["samples"]
    _ok(_lmm("predict", *args, f"--ckpt_path={ckpt}", cwd=tmp_path))
    assert len(_rows(_newest(tmp_path, "predictions.jsonl"))) == 16
    image = sorted((synthetic_data / "images").glob("colour-*.png"))[0]
    script = (
        "import json, lmm\n"
        f"model = lmm.load({str(ckpt)!r})\n"
        "messages = [{'role': 'user', 'content': 'What colour is the shape?\\n<image>'}]\n"
        f"print(json.dumps(model.generate(messages, images=[{str(image)!r}])))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], env=ENV, cwd=tmp_path, capture_output=True, text=True
    )
    _ok(loaded)
    assert isinstance(json.loads(loaded.stdout.strip().splitlines()[-1]), str)
    config = tmp_path / "version_0/config.yaml"
    hf = tmp_path / "hf"
    export = _lmm(
        "convert", "export", f"--config={config}", f"--ckpt={ckpt}", f"--out={hf}", cwd=tmp_path
    )
    if export.returncode == 0:
        assert (hf / "config.json").is_file()
    else:
        assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr[-3000:]
        [line] = [x for x in export.stderr.splitlines() if x.startswith("lmm convert export:")]
        assert "merge 2" in line
