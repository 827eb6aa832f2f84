"""Benchmarks inside the Lightning loop: `Task` (a benchmark file as a dataloader) and results on disk.

A `Task` reads a benchmark's published file with its module in `lmm.evaluation.tasks` (or its
lmms-eval hub dataset, `path: hf:lmms-lab/POPE`, through `lmm.evaluation.hub`), and, given
the model's answers, parses them, updates the benchmark's torchmetrics metric and returns one
prediction row per sample. `ChatDataModule(val_tasks=..., test_tasks=...)` turns tasks into
dataloaders; `LMMModule` scores them, logs `val/<task>/<metric>` or `test/<task>/<metric>`, and
after `lmm test` calls `write_results`: `predictions/<task>.jsonl` and `results.json` in the
run's log folder, which `lmm report` reads.
"""

from __future__ import annotations

import glob
import importlib
import json
import math
import pkgutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torchmetrics import Metric

from lmm.data.batch import Batch
from lmm.data.datamodule import PromptTask
from lmm.data.media import media_kind
from lmm.data.sample import Sample, VideoRef
from lmm.data.templates import ChatTemplate, render_text
from lmm.evaluation import hub, tasks
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.utils.logging import get_logger

log = get_logger(__name__)


def _declaration(module: ModuleType) -> Benchmark | None:
    """The module's own `BENCHMARK = Benchmark(...)`, or None (its tasks then need a `metric`)."""
    spec = getattr(module, "BENCHMARK", None)
    return spec if isinstance(spec, Benchmark) else None


def _builtin_benchmarks() -> dict[str, Benchmark]:
    """`{name: BENCHMARK}` of the modules of `lmm.evaluation.tasks` that declare one."""
    names = [m.name for m in pkgutil.iter_modules(tasks.__path__) if not m.name.startswith("_")]
    specs = {n: _declaration(importlib.import_module(f"{tasks.__name__}.{n}")) for n in names}
    return {n: spec for n, spec in specs.items() if spec is not None}


# The built-in benchmarks, listed from their modules (each declares its own `BENCHMARK`).
BENCHMARKS: dict[str, Benchmark] = _builtin_benchmarks()


def benchmark_table() -> list[dict[str, str]]:
    """One row per built-in benchmark: name, metric and headline, local files, hub dataset."""
    rows = []
    for name, spec in sorted(BENCHMARKS.items()):
        rows.append(
            {
                "benchmark": name,
                "metric": f"{getattr(spec.metric, '__name__', spec.metric)} ({spec.headline})",
                "local": spec.local or "-",
                "hub": spec.hub.describe() if spec.hub else "- (local files only)",
            }
        )
    return rows


class Task(PromptTask):
    """One benchmark file scored by its official rule: reader, prompt, answer parser and metric."""

    def __init__(
        self,
        benchmark: str,
        path: str,
        name: str | None = None,
        root: str | None = None,
        subset: str | list[str] | None = None,
        split: str | None = None,
        revision: str | None = None,
        read_args: dict[str, Any] | None = None,
        parse_args: dict[str, Any] | None = None,
        metric: Metric | None = None,
        headline: str | None = None,
        max_new_tokens: int | None = None,
        limit: int | None = None,
        max_frames: int = 8,
        check_media: bool = True,
    ):
        """
        Args:
            benchmark: a module of `lmm.evaluation.tasks` (`pope`, `mmbench`, `vqav2`, ...) or the
                dotted path of your own module with `read(path, root, **kw)` and `parse(output, meta)`
                (and, for defaults, `BENCHMARK = Benchmark(...)` as the built-in modules have).
            path: the benchmark file in its published format (docs/evaluation.md), or a glob of
                several (DEMON's `*/*/core/core.json`, MVBench's per-task files), or
                `hf:<dataset>`: the benchmark's hub dataset (`hf:lmms-lab/POPE`; also a local
                folder in the hub layout or written by `save_to_disk`, `hf:/data/pope`), read
                with `datasets` and its embedded images written to files once.
            name: the task's name in logged keys (`test/<name>/<metric>`) and output files
                (default: the benchmark).
            root: folder the media paths are relative to (default: the file's folder); for a
                hub dataset whose media are not embedded (MVBench videos), their folder.
            subset: the hub dataset's subset (config), or a list of several (default: the one
                lmms-eval reads; for a benchmark with a subset per subtask, all of them).
            split: the hub dataset's split (default: the one lmms-eval scores).
            revision: the hub dataset's git revision (default: the one lmms-eval reads).
            read_args: keyword arguments of the reader, e.g. `{circular: true}` for MMBench.
            parse_args: keyword arguments of the parser, e.g. `{mode: lmms_eval}`.
            metric: the torchmetrics metric (default: the official rule, its module's `BENCHMARK`),
                e.g. `{class_path: lmm.evaluation.tasks.pope.POPEMetrics, init_args: {mode: lmms_eval}}`.
            headline: the metric key reports show (default: the benchmark's, e.g. POPE `f1`).
            max_new_tokens: answer length (default: the model's `max_new_tokens`).
            limit: score only the first `limit` prompts (quick runs).
            max_frames: frames sampled from each video of a video benchmark (MVBench).
            check_media: fail at reading when a media file is missing.
        """
        self.benchmark = benchmark
        self.path = path
        self.name = name or benchmark.rsplit(".", 1)[-1]
        self.root = root
        self.subset = subset
        self.split = split
        self.revision = revision
        self.read_args = dict(read_args or {})
        self.parse_args = dict(parse_args or {})
        self.max_new_tokens = max_new_tokens
        self.limit = limit
        self.max_frames = max_frames
        self.check_media = check_media
        self.module = _benchmark_module(benchmark)
        self.spec = _declaration(self.module)
        self._metric = metric
        self.headline = headline or (self.spec.headline if self.spec else "accuracy")
        self.scale = self.spec.scale if self.spec else 100.0
        self._samples: list[Sample] | None = None
        self._by_id: dict[str, Sample] = {}
        self.seen = 0  # samples scored since the last reset

    def __repr__(self) -> str:
        return f"Task({self.name!r}, benchmark={self.benchmark!r}, path={self.path!r})"

    # --- reading ------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """The benchmark files `path` names (a file, or the sorted matches of a glob); for a hub
        dataset, its rows as records of the local format (`lmm.evaluation.hub.record_files`)."""
        if hub.is_hub(self.path):
            return self._hub_files()
        if any(c in self.path for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(self.path, recursive=True))
            if not matches:
                raise FileNotFoundError(
                    f"task {self.name!r}: no file matches {self.path!r}; check the path/glob"
                )
            return matches
        if not Path(self.path).is_file():
            raise FileNotFoundError(
                f"task {self.name!r}: benchmark file {self.path} does not exist; "
                f"see docs/evaluation.md for where to get {self.benchmark} and its format"
            )
        return [Path(self.path)]

    def _hub_files(self) -> list[Path]:
        source = self.spec.hub if self.spec else None
        if source is not None and source.media_root and self.root is None:
            raise ValueError(
                f"task {self.name!r}: {self.path} does not embed its media; give `root`, the "
                "folder they are in (docs/evaluation.md says where to get them)"
            )
        return hub.record_files(
            self.path,
            source,
            subset=self.subset,
            split=self.split,
            revision=self.revision,
            task=self.name,
        )

    def samples(self) -> list[Sample]:
        """The prompts, read once; videos (by file suffix) become frame-sampled `VideoRef`s."""
        if self._samples is None:
            samples: list[Sample] = []
            for f in self.files():
                samples += self.module.read(
                    f, self.root, check_media=self.check_media, **self.read_args
                )
            if self.limit is not None:
                samples = samples[: self.limit]
            for s in samples:
                s.images = [self._media(m) for m in s.images]
            self._samples = samples
            self._by_id = {s.id: s for s in samples}
        return self._samples

    def _media(self, item):
        if isinstance(item, Path) and media_kind(item) == "video":
            return VideoRef(item, max_frames=self.max_frames)
        return item

    # --- scoring ------------------------------------------------------------------------
    @property
    def metric(self) -> Metric:
        """The benchmark's metric (built on first use: DEMON's needs the datasets read)."""
        if self._metric is None:
            if self.spec is None:
                raise ValueError(
                    f"task {self.name!r}: benchmark {self.benchmark!r} has no default metric; "
                    "give `metric` (a torchmetrics Metric taking parsed answers and metas)"
                )
            self._metric = self.spec.build_metric(self.samples())
        return self._metric

    def parse(self, output: str, meta: Mapping):
        """The benchmark's answer parser on a raw output (with `parse_args`)."""
        return self.module.parse(output, meta, **self.parse_args)

    def score(self, parsed, meta: Mapping) -> float | None:
        """One sample's score in [0, 1] (soft for VQA and DEMON), or None if the benchmark has none."""
        if self.spec is not None:
            return self.spec.score(parsed, meta, self.metric)
        is_correct = getattr(self.module, "is_correct", None)
        return float(is_correct(parsed, meta)) if is_correct is not None else None

    def update(
        self, answers: Sequence[str], batch: Batch, template: ChatTemplate | None = None
    ) -> list[dict]:
        """Score a batch's answers: update the metric; return one prediction row per sample."""
        metric = self.metric
        device = batch.input_ids.device
        if metric.device != device:
            metric.to(device)
        parsed = [self.parse(a, m) for a, m in zip(answers, batch.meta, strict=True)]
        metric.update(parsed, batch.meta)
        self.seen += len(answers)
        rows = []
        for sid, answer, p, meta in zip(batch.ids, answers, parsed, batch.meta, strict=True):
            score = self.score(p, meta)
            rows.append(
                {
                    "id": sid,
                    "task": self.name,
                    "prompt": self.prompt_text(sid, template),
                    "output": answer,
                    "parsed": p,
                    "answer": _jsonable(meta.get("answer", meta.get("answers"))),
                    "correct": None if score is None else score >= 1.0,
                    "score": score,
                }
            )
        return rows

    def prompt_text(self, sample_id: str, template: ChatTemplate | None = None) -> str:
        """What the model was asked: the templated prompt (media as `<image>`), or the turns' text."""
        sample = self._by_id.get(sample_id)
        if sample is None:
            return ""
        prefix = sample.meta.get("assistant_prefix") or ""
        if template is not None:
            return render_text(template.render(sample.turns, add_generation_prompt=True)) + prefix
        return "\n".join(t.text for t in sample.turns) + prefix

    def compute(self) -> dict[str, float]:
        """The metric's results as plain floats (synced across ranks by torchmetrics)."""
        return {k: float(v) for k, v in self.metric.compute().items()}

    def reset(self) -> None:
        self.metric.reset()
        self.seen = 0


def _benchmark_module(benchmark: str) -> ModuleType:
    name = benchmark if "." in benchmark else f"lmm.evaluation.tasks.{benchmark}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"unknown benchmark {benchmark!r} ({err}); use one of {sorted(BENCHMARKS)} or the "
            "dotted path of a module with `read` and `parse`"
        ) from err
    missing = [f for f in ("read", "parse") if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"benchmark module {name} has no {' or '.join(missing)} function")
    return module


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# --------------------------------------------------------------------------- results on disk


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's prediction rows (on rank 0 in rank order; unchanged without distribution)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list[list[dict] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [r for part in gathered for r in (part or [])]


def model_label(checkpoint: str | None) -> str:
    """A short model name from a checkpoint path: the run folder above `checkpoints/version_N`."""
    if not checkpoint:
        return "model"
    path = Path(checkpoint)
    for parent in path.parents:
        if parent.name and parent.name != "checkpoints" and not parent.name.startswith("version_"):
            return parent.name
    return path.stem


def write_results(
    trainer,
    tasks: Sequence[Task],
    results: Mapping[str, Mapping[str, float]],
    predictions: Mapping[str, list[dict]],
    out_dir: str | Path | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path | None:
    """Write `predictions/<task>.jsonl` and `results.json` to `out_dir` (default: the log folder).

    `extra` adds entries that are no `Task` (the test file's: `benchmark`, `file`, `headline`,
    `scale`, `metrics`), each with its rows in `predictions` under the same name. Called on
    every rank (predictions are gathered); rank 0 writes. Returns the results file.
    """
    gathered = {name: gather_rows(rows) for name, rows in predictions.items()}
    if trainer.global_rank != 0:
        return None
    out = Path(out_dir or trainer.log_dir or trainer.default_root_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    by_name = {t.name: t for t in tasks}
    summary: dict[str, Any] = {
        "model": model_label(trainer.ckpt_path),
        "checkpoint": trainer.ckpt_path,
        "tasks": {},
    }
    for name, metrics in results.items():
        task = by_name.get(name)
        rows = gathered.get(name, [])
        _write_rows(out / "predictions" / f"{name}.jsonl", rows)
        headline = task.headline if task else "accuracy"
        summary["tasks"][name] = {
            "benchmark": task.benchmark if task else name,
            "file": str(task.path) if task else None,
            "samples": len(rows),
            "headline": headline,
            "score": _jsonable(metrics.get(headline)),
            "scale": task.scale if task else 100.0,
            "metrics": {k: _jsonable(v) for k, v in metrics.items()},
        }
    for name, entry in (extra or {}).items():
        rows = gathered.get(name, [])
        _write_rows(out / "predictions" / f"{name}.jsonl", rows)
        metrics = entry.get("metrics") or {}
        summary["tasks"][name] = {
            "benchmark": entry.get("benchmark", name),
            "file": entry.get("file"),
            "samples": len(rows),
            "headline": entry.get("headline", "accuracy"),
            "score": _jsonable(metrics.get(entry.get("headline", "accuracy"))),
            "scale": entry.get("scale", 100.0),
            "metrics": {k: _jsonable(v) for k, v in metrics.items()},
        }
    path = out / "results.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("results of %d tasks in %s", len(summary["tasks"]), path)
    return path


def _write_rows(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
