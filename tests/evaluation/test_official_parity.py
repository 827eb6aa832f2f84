"""Every benchmark × every offered rule equals its official scorer, case by case and in aggregate.

Each fixture `tests/fixtures/official/<benchmark>/<rule>.json` was made outside the project: a
benchmark file of our own cases in the benchmark's published format (`data`), model outputs,
and what the official code (named with its repository, commit and function in `official`)
made of them. Only inputs and expected outputs are committed, never the official code.

Fixture fields:
- `benchmark`, `data` (file beside the fixture), `root` (media folder, default the fixture's);
- `task`: `Task` arguments of the rule (`read_args`, `parse_args`, `metric` as
  `{class_path, init_args}`);
- `cases`: `{id, output}` plus what the official code gave: `parsed` (its extracted answer),
  `score` (its per-sample score: 1/0, or a soft VQA score); either may be absent where the
  official code has none;
- `aggregate`: the official totals under lmm's metric keys (`tolerance`: absolute, default 1e-6).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from lmm.evaluation.runner import Task

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"
PATHS = sorted(FIXTURES.glob("*/*.json"))


def _metric(spec: dict | None):
    if spec is None:
        return None
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def _task(fixture: dict, folder: Path) -> Task:
    args = dict(fixture.get("task", {}))
    metric = _metric(args.pop("metric", None))
    return Task(
        fixture["benchmark"],
        str(folder / fixture["data"]),
        root=str(folder / fixture.get("root", ".")),
        check_media=False,
        metric=metric,
        **args,
    )


def test_fixtures_name_their_source():
    for path in PATHS:
        official = json.loads(path.read_text())["official"]
        assert {"repo", "commit", "function"} <= set(official), path
        assert len(official["commit"]) == 40, path


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_official_parity(path):
    fixture = json.loads(path.read_text())
    task = _task(fixture, path.parent)
    samples = {s.id: s for s in task.samples()}
    assert len(fixture["cases"]) >= 30, "a parity fixture holds at least 30 cases"
    parsed_all, metas, wrong = [], [], []
    for case in fixture["cases"]:
        meta = samples[str(case["id"])].meta
        parsed = task.parse(case["output"], meta)
        score = task.score(parsed, meta)
        if "parsed" in case and parsed != case["parsed"]:
            wrong.append((case["id"], case["output"], "parsed", parsed, case["parsed"]))
        if "score" in case and (score is None or abs(score - case["score"]) > 1e-9):
            wrong.append((case["id"], case["output"], "score", score, case["score"]))
        parsed_all.append(parsed)
        metas.append(meta)
    assert not wrong, f"{len(wrong)} cases differ from the official scorer: {wrong[:10]}"
    task.metric.update(parsed_all, metas)
    results = task.compute()
    tolerance = fixture.get("tolerance", 1e-6)
    for key, expected in fixture["aggregate"].items():
        assert key in results, f"{key} not in lmm's results {sorted(results)}"
        assert results[key] == pytest.approx(expected, abs=tolerance), key
