"""`lmm report`: results.json files → markdown table and chart (radar from three tasks, else
bars) across benchmarks and models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmm.cli import main
from lmm.evaluation.report import load_runs, markdown, radar


def _results(folder: Path, model: str, tasks: dict[str, tuple[float, float, dict]]) -> Path:
    """Write a results.json as `lmm test` does: {task: (headline score, scale, metrics)}."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    body = {
        name: {
            "benchmark": name,
            "samples": 10,
            "headline": next(iter(metrics)),
            "score": score,
            "scale": scale,
            "metrics": metrics,
        }
        for name, (score, scale, metrics) in tasks.items()
    }
    path.write_text(json.dumps({"model": model, "checkpoint": None, "tasks": body}))
    return path


@pytest.fixture
def two_models(tmp_path) -> Path:
    runs = tmp_path / "runs"
    _results(runs / "a/pope", "llava-a", {"pope": (85.25, 100, {"f1": 85.25, "accuracy": 86.0})})
    _results(
        runs / "a/suite",
        "llava-a",
        {
            "mme": (1510.7, 2000, {"perception": 1510.7, "cognition": 300.0}),
            "gqa": (61.9, 100, {"accuracy": 61.9}),
        },
    )
    _results(
        runs / "b",
        "llava-b",
        {
            "pope": (80.0, 100, {"f1": 80.0, "accuracy": 81.5}),
            "gqa": (58.04, 100, {"accuracy": 58.04}),
            "videofeedback": (float("nan"), 100, {"mean": float("nan")}),
        },
    )
    return runs


def test_runs_of_one_model_merge_into_one_row(two_models):
    runs = load_runs([two_models])
    assert [r.model for r in runs] == ["llava-a", "llava-b"]
    assert set(runs[0].tasks) == {"pope", "mme", "gqa"}
    table = markdown(runs)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    assert header == (
        "| model | gqa (accuracy) | mme (perception) | pope (f1) | videofeedback (mean) |"
    )
    assert "| llava-a | 61.9 | 1510.7 | 85.2 | – |" in lines  # 85.25 rounds half to even
    assert "| llava-b | 58.0 | – | 80.0 | – |" in lines
    assert "| cognition | 300.0 | – |" in lines  # the per-task detail tables
    names = load_runs(sorted(two_models.rglob("results.json")), names=["x", "x", "y"])
    assert [r.model for r in names] == ["x", "y"]


def test_radar_chart_is_a_png(two_models, tmp_path):
    png = radar(load_runs([two_models]), tmp_path / "radar.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_command(two_models, tmp_path, capsys):
    main(["report", str(two_models), "--out", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    written = (tmp_path / "report/report.md").read_text()
    assert printed == written and "| llava-b |" in written
    assert (tmp_path / "report/radar.png").stat().st_size > 5000
    assert not (tmp_path / "report/bars.png").exists()


@pytest.mark.parametrize("n_tasks", [1, 2])
def test_bar_chart_below_three_tasks(tmp_path, n_tasks):
    """A radar of one or two axes says nothing: below three tasks the chart is bars."""
    tasks = {"pope": (85.0, 100, {"f1": 85.0}), "mme": (1500.0, 2000, {"perception": 1500.0})}
    tasks = dict(list(tasks.items())[:n_tasks])
    _results(tmp_path / "runs/a", "llava-a", tasks)
    _results(tmp_path / "runs/b", "llava-b", {"pope": (80.0, 100, {"f1": 80.0})})
    main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    png = (tmp_path / "report/bars.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (tmp_path / "report/radar.png").exists()
    table = (tmp_path / "report/report.md").read_text()
    assert "| llava-b | " in table and table.count("\n## ") == n_tasks


def test_report_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json under"):
        load_runs([tmp_path])
    bad = tmp_path / "results.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a results.json of `lmm test`"):
        load_runs([bad])
    with pytest.raises(ValueError, match="2 names for 1 results files"):
        load_runs([bad], names=["a", "b"])
