"""Scoring and prediction files: what `lmm test` and `lmm predict` leave in the log folder.

An `LMMModule` answers (its objective's test and predict steps give one record per row); these
callbacks score and write. `Scoring` scores a benchmark batch (`batch.task`) with its task's
official rule and a test-file batch by exact match against its reference (overall and per
`meta["task"]`), and at the end of `lmm test` writes `results.json` and
`predictions/<task>.jsonl` (the test file's as `test`). `PredictionWriter` writes
`predictions.jsonl` as `lmm predict` answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lmm.data.batch import Batch
from lmm.evaluation.metrics import ExactMatch, normalize_answer
from lmm.evaluation.runner import write_results
from lmm.utils.logging import get_logger

log = get_logger(__name__)

# The results.json entry of the test file, and the name of its predictions file.
TEST_FILE = "test"


class Scoring(L.Callback):
    """Scores what the module answered; logs `{split}/{task}/{metric}` and `test/accuracy`."""

    def __init__(self):
        self.accuracy: dict[str, ExactMatch] = {}  # "" = every test answer, else per meta task
        self.task_rows: dict[str, list[dict]] = {}
        self.results: dict[str, dict[str, float]] = {}  # this test's, by benchmark task
        self.file_metrics: dict[str, float] = {}  # the test file's exact match, ×100
        self._file_tested = False

    @staticmethod
    def tasks(trainer, split: str) -> dict:
        """The datamodule's benchmark tasks of a split, by name."""
        datamodule = getattr(trainer, "datamodule", None)
        loader_tasks = getattr(datamodule, "loader_tasks", None)
        found = loader_tasks(split) if loader_tasks is not None else []
        return {t.name: t for t in found if t is not None}

    def _score_task(self, trainer, split: str, rows: list[dict], batch: Batch) -> None:
        task = self.tasks(trainer, split).get(batch.task)
        if task is None:
            raise ValueError(
                f"batch of task {batch.task!r} but the datamodule has no such {split} task"
            )
        template = getattr(trainer.datamodule, "template", None)
        scored = task.update([r["prediction"] for r in rows], batch, template=template)
        if split == "test":
            self.task_rows.setdefault(task.name, []).extend(scored)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dl_idx=0):
        if batch.task is not None:
            self._score_task(trainer, "val", outputs, batch)

    def on_validation_epoch_end(self, trainer, module) -> None:
        self._log_tasks(trainer, module, "val")

    def on_test_epoch_start(self, trainer, module) -> None:
        self.accuracy = {}
        self.task_rows = {}
        self.results = {}
        self.file_metrics = {}
        datamodule = getattr(trainer, "datamodule", None)
        loader_tasks = getattr(datamodule, "loader_tasks", None)
        # a test file is its split's first loader (`ChatDataModule.loader_tasks`); without a
        # datamodule that says, every batch without a task is one
        self._file_tested = loader_tasks is None or None in loader_tasks("test")

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dl_idx=0) -> None:
        if batch.task is not None:
            self._score_task(trainer, "test", outputs, batch)
            return
        self._file_tested = True
        self.task_rows.setdefault(TEST_FILE, []).extend(outputs)
        for row in outputs:
            if "reference" not in row:  # scores, not answers: the objective logs its metrics
                continue
            row["correct"] = normalize_answer(row["prediction"]) == normalize_answer(
                row["reference"]
            )
            for key in ("", row.get("task")):
                if key is not None:
                    if key not in self.accuracy:
                        self.accuracy[key] = ExactMatch().to(module.device)
                    self.accuracy[key].update([row["prediction"]], [row["reference"]])

    def on_test_epoch_end(self, trainer, module) -> None:
        for key, metric in sorted(self.accuracy.items()):
            value = metric.compute()
            module.log(f"test/accuracy/{key}" if key else "test/accuracy", value)
            # ×100 as every benchmark's; rounded off float32 noise (95.0, not 94.9999988)
            self.file_metrics[key or "accuracy"] = round(100 * float(value), 4)
            metric.reset()
        self.results = self._log_tasks(trainer, module, "test")

    def on_test_end(self, trainer, module) -> None:
        """`results.json` and the predictions files, once every metric of the test is logged
        (the objective's, such as a score head's, come after this callback's epoch end)."""
        tasks = list(self.tasks(trainer, "test").values())
        extra = {}
        if self._file_tested:
            datamodule = getattr(trainer, "datamodule", None)
            files = getattr(datamodule, "files", None) or {}
            extra[TEST_FILE] = _file_entry(
                files.get("test"), self.file_metrics, _objective_metrics(trainer, tasks)
            )
        if self.results or extra:
            write_results(trainer, tasks, self.results, self.task_rows, extra=extra)

    def _log_tasks(self, trainer, module, split: str) -> dict[str, dict[str, float]]:
        """Log `{split}/{task}/{metric}` for every task scored this epoch; their results."""
        results = {}
        for task in self.tasks(trainer, split).values():
            # Every rank must agree before `compute` (a collective): sum the samples seen.
            seen = trainer.strategy.reduce(
                torch.tensor(float(task.seen), device=module.device), reduce_op="sum"
            )
            if not float(seen):
                continue
            results[task.name] = task.compute()
            task.reset()
            module.log_dict(
                {f"{split}/{task.name}/{k}": v for k, v in results[task.name].items()},
                add_dataloader_idx=False,
            )
        return results


def _objective_metrics(trainer, tasks) -> dict[str, float]:
    """The test metrics the objective logged (a score head's `test/score/...`), without the
    benchmarks' and the exact-match accuracies (those are in the entry already, ×100)."""
    prefixes = tuple(f"test/{t.name}/" for t in tasks)
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith("test/") and not key.startswith(prefixes):
            name = key[len("test/") :]
            if name != "accuracy" and not name.startswith("accuracy/"):
                out[name] = float(value)
    return out


def _file_entry(path, accuracy: dict[str, float], objective: dict[str, float]) -> dict:
    """The results.json entry of the test file: exact match ×100 (`accuracy`, and one per
    record `task`), then the objective's own metrics. The headline is `accuracy`, or for a
    score head its mean Spearman correlation."""
    metrics = {**accuracy, **objective}
    headline = next((k for k in ("accuracy", "score/spearman") if k in metrics), None)
    if headline is None:
        headline = next(iter(metrics), "accuracy")
    return {
        "benchmark": "chat",  # the rule of lmm.evaluation.tasks.chat: exact match, per task
        "file": None if path is None else str(path),
        "headline": headline,
        "scale": 100.0 if headline in accuracy else 1.0,
        "metrics": metrics,
    }


class PredictionWriter(BasePredictionWriter):
    """Writes `lmm predict`'s records as they come, one JSON line per sample: `id`, `prompt`
    (templated, media as `<image>`), `prediction` (or a score head's `scores`), and the record's
    `reference` and `task` where it has them. The file is `predictions.jsonl` in the run's log
    folder (with several ranks, `predictions.rank<r>.jsonl` per rank)."""

    def __init__(self, filename: str = "predictions.jsonl"):
        """
        Args:
            filename: the file's name in the log folder.
        """
        super().__init__(write_interval="batch")
        self.filename = filename
        self.path: Path | None = None
        self.written = 0
        self._file = None

    @classmethod
    def unless_configured(cls, trainer) -> PredictionWriter:
        """The trainer's own `PredictionWriter` (a recipe's `trainer.callbacks`, e.g. another
        `filename`), else the default: Lightning lets a module's callbacks replace the
        trainer's of the same type."""
        for callback in getattr(trainer, "callbacks", None) or []:
            if isinstance(callback, cls):
                return callback
        return cls()

    def on_predict_start(self, trainer, module) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)
        name = self.filename
        if trainer.world_size > 1:
            name = f"{Path(name).stem}.rank{trainer.global_rank}{Path(name).suffix}"
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / name
        self.written = 0
        self._file = self.path.open("w", encoding="utf-8")

    def write_on_batch_end(
        self, trainer, module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        for row in prediction:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()  # a long run's file is readable while it runs
        self.written += len(prediction)

    def on_predict_end(self, trainer, module) -> None:
        self._close()
        log.info("%d predictions in %s", self.written, self.path)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
