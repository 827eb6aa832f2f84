"""Exact resume: SIGKILL mid-run, resume from the last checkpoint, bit-identical afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _job(assets: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tests.data.resume_job", str(assets), str(data), str(out), *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _losses(out: Path) -> dict[int, str]:
    rows = (out / "losses.txt").read_text().splitlines()
    losses = {int(r.split()[0]): r.split(" ", 1)[1] for r in rows}
    assert len(losses) == len(rows), "a step was recorded twice"
    return losses


@pytest.mark.slow
def test_exact_resume(tiny_assets, synthetic_data, tmp_path):
    # a small jsonl train file, so the run crosses an epoch boundary
    records = json.loads((synthetic_data / "train.json").read_text())[:20]
    data = tmp_path / "data"
    data.mkdir()
    # a copy: a symlink out of the data root is refused (lmm.data.formats._resolve)
    shutil.copytree(synthetic_data / "images", data / "images")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assets = Path(tiny_assets["llm"]).parent
    steps, kill_at = 10, 6

    full = _job(assets, data, tmp_path / "full", "--max-steps", str(steps))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _job(
        assets, data, tmp_path / "part", "--max-steps", str(steps), "--kill-at", str(kill_at)
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(_losses(tmp_path / "part")) == list(range(1, kill_at + 1))
    resumed = _job(assets, data, tmp_path / "part", "--max-steps", str(steps), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(expected) == sorted(got) == list(range(1, steps + 1))
    assert got == expected  # bit-identical losses (hex floats) and the same samples
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
