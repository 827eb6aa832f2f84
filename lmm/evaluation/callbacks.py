"""Scoring: benchmark tasks and test answers scored, logged and written, beside the module.

An `LMMModule` answers (its objective's test step gives one record per row); this callback
scores: a benchmark batch (`batch.task`) with its task's official rule, a test-file batch by
exact match against its reference (overall and per `meta["task"]`). At the end of a test epoch
with benchmarks it writes `predictions/<task>.jsonl` and `results.json` to the log folder.
"""

from __future__ import annotations

import lightning as L
import torch

from lmm.data.batch import Batch
from lmm.evaluation.metrics import ExactMatch, normalize_answer
from lmm.evaluation.runner import write_results


class Scoring(L.Callback):
    """Scores what the module answered; logs `{split}/{task}/{metric}` and `test/accuracy`."""

    def __init__(self):
        self.accuracy: dict[str, ExactMatch] = {}  # "" = every test answer, else per meta task
        self.task_rows: dict[str, list[dict]] = {}

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

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dl_idx=0) -> None:
        if batch.task is not None:
            self._score_task(trainer, "test", outputs, batch)
            return
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
            module.log(f"test/accuracy/{key}" if key else "test/accuracy", metric.compute())
            metric.reset()
        results = self._log_tasks(trainer, module, "test")
        if results:
            tasks = list(self.tasks(trainer, "test").values())
            write_results(trainer, tasks, results, self.task_rows)

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
