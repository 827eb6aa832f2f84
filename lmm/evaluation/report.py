"""`lmm report`: the `results.json` of `lmm test` runs as a markdown table and a chart.

One row per model, one column per task (its headline metric: POPE F1, MMBench circular, MME
perception, a test file's accuracy, ...), then every metric of every task. With three tasks
or more the chart is a radar: each task on an axis scaled to its best value (100, or 2000 for
MME perception), one polygon per model; with one or two (a radar of two axes is a line) it is
a bar chart on the same scale, one bar per model and task.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmm.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class Run:
    """The results of one model: headline score, scale and all metrics per task."""

    model: str
    source: Path
    tasks: dict[str, dict] = field(default_factory=dict)


def find_results(paths: Sequence[str | Path]) -> list[Path]:
    """`results.json` files: the paths given, and those found under given folders (sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            hits = sorted(p.rglob("results.json"))
            if not hits:
                raise FileNotFoundError(f"no results.json under {p}; run `lmm test` first")
            found += hits
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such results file or folder")
    return found


def load_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Run]:
    """Read results files; runs of the same model (several benchmark runs) merge into one row."""
    files = find_results(paths)
    if names is not None and len(names) != len(files):
        raise ValueError(f"{len(names)} names for {len(files)} results files ({files})")
    runs: dict[str, Run] = {}
    for i, f in enumerate(files):
        data = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            raise ValueError(f"{f}: not a results.json of `lmm test` (no `tasks` object)")
        model = names[i] if names is not None else str(data.get("model") or f.parent.name)
        run = runs.setdefault(model, Run(model, f))
        for task, entry in data["tasks"].items():
            if task in run.tasks:
                log.warning(
                    "%s: task %s of model %s also in %s; keeping the later",
                    f,
                    task,
                    model,
                    run.source,
                )
            run.tasks[task] = entry
    return list(runs.values())


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}" if isinstance(value, (int, float)) else str(value)


def markdown(runs: Sequence[Run]) -> str:
    """A headline table (models × tasks) and, per task, a table of all its metrics."""
    tasks = sorted({t for r in runs for t in r.tasks})
    head = [
        "| model | " + " | ".join(f"{t} ({_headline(runs, t)})" for t in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for r in runs:
        cells = [_fmt(r.tasks[t].get("score")) if t in r.tasks else "–" for t in tasks]
        head.append(f"| {r.model} | " + " | ".join(cells) + " |")
    out = ["# Evaluation results", "", *head]
    for t in tasks:
        keys = sorted({k for r in runs if t in r.tasks for k in r.tasks[t].get("metrics", {})})
        out += ["", f"## {t}", "", "| metric | " + " | ".join(r.model for r in runs) + " |"]
        out.append("|---|" + "---:|" * len(runs))
        for k in keys:
            cells = [_fmt(r.tasks[t]["metrics"].get(k)) if t in r.tasks else "–" for r in runs]
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        samples = [str(r.tasks[t].get("samples", "–")) if t in r.tasks else "–" for r in runs]
        out.append("| samples | " + " | ".join(samples) + " |")
    return "\n".join(out) + "\n"


def _headline(runs: Sequence[Run], task: str) -> str:
    return next((r.tasks[task].get("headline", "") for r in runs if task in r.tasks), "")


def _scale(runs: Sequence[Run], task: str) -> float:
    return next((r.tasks[task].get("scale") or 100.0 for r in runs if task in r.tasks), 100.0)


def radar(runs: Sequence[Run], png: str | Path, title: str = "lmm evaluation") -> Path:
    """Save a radar chart: one axis per task (headline / scale × 100), one polygon per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in runs for t in r.tasks})
    if not tasks:
        raise ValueError("no task results to plot")
    angles = [2 * math.pi * k / len(tasks) for k in range(len(tasks))]
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"projection": "polar"})
    for r in runs:
        # NaN where the model has no score: a gap, not a zero
        values = [_percent(r.tasks.get(t, {})) for t in tasks]
        closed_a, closed_v = [*angles, angles[0]], [*values, values[0]]
        ax.plot(closed_a, closed_v, marker="o", label=r.model)
        if not any(math.isnan(v) for v in values):
            ax.fill(closed_a, closed_v, alpha=0.1)
    ax.set_xticks(angles)
    scales = {t: _scale(runs, t) for t in tasks}
    ax.set_xticklabels([t if scales[t] == 100 else f"{t}\n(/{scales[t]:g})" for t in tasks])
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1))
    return _save(fig, png)


def _save(fig, png: str | Path) -> Path:
    """Write a chart (its folder made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _percent(entry: dict) -> float:
    """A task's headline as a percentage of its best value; NaN where there is no score."""
    score, scale = entry.get("score"), entry.get("scale") or 100.0
    ok = isinstance(score, (int, float)) and not math.isnan(score)
    return max(0.0, 100.0 * score / scale) if ok else math.nan


def bars(runs: Sequence[Run], png: str | Path, title: str = "lmm evaluation") -> Path:
    """Save a bar chart: per task a group of bars (headline / scale × 100), one per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in runs for t in r.tasks})
    if not tasks:
        raise ValueError("no task results to plot")
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 1.2 * len(tasks) * len(runs)), 4))
    for i, r in enumerate(runs):
        values = [_percent(r.tasks.get(t, {})) for t in tasks]  # NaN: no bar
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(tasks))]
        drawn = ax.bar(xs, values, width, label=r.model)
        ax.bar_label(drawn, fmt="%.1f", fontsize=8)
    scales = {t: _scale(runs, t) for t in tasks}
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([_label(runs, t, scales[t]) for t in tasks])
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of the best score")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, png)


def _label(runs: Sequence[Run], task: str, scale: float) -> str:
    label = f"{task} ({_headline(runs, task)})"
    return label if scale == 100 else f"{label}\n(/{scale:g})"


def chart(runs: Sequence[Run], out: str | Path) -> Path:
    """`radar.png` in `out` for three tasks or more, else `bars.png`."""
    tasks = {t for r in runs for t in r.tasks}
    if len(tasks) >= 3:
        return radar(runs, Path(out) / "radar.png")
    return bars(runs, Path(out) / "bars.png")


def main(argv: list[str] | None = None) -> str:
    """`lmm report RUNS...`: write report.md and a chart (radar.png or bars.png); returns the
    markdown."""
    parser = argparse.ArgumentParser(prog="lmm report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "results", nargs="+", help="results.json files, or run folders holding them (searched)"
    )
    parser.add_argument("--out", default="runs/report", help="folder for report.md and the chart")
    parser.add_argument("--names", nargs="+", help="a model name per results file, in order")
    a = parser.parse_args(argv)
    runs = load_runs(a.results, a.names)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(runs)
    (out / "report.md").write_text(text, encoding="utf-8")
    png = chart(runs, out)
    log.info("report of %d models in %s (report.md, %s)", len(runs), out, png.name)
    return text
