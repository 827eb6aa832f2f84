"""Any chat data file as a benchmark: exact match with its last assistant turn, overall and per
record `task` (the synthetic shapes tasks of the quickstart: `recipes/eval/synthetic.yaml`).

The file is in lmm's chat formats (Mantis or LLaVA json/jsonl, `docs/data.md`); each record's
last assistant turn is the reference and the turns before it the prompt. An answer is right
when it equals the reference after `normalize_answer` (case, surrounding space and trailing
`.!?` ignored), the rule `lmm test` applies to a recipe's own test file (`test/accuracy`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lmm.data.formats import load_samples
from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.metrics import normalize_answer
from lmm.evaluation.tasks._base import GroupedMean
from lmm.evaluation.tasks._benchmark import Benchmark

ALL = ""  # the group of records without a `task`


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """The file's records with their last assistant turn moved to `meta["answer"]` (a record
    whose last turn is not the assistant's has nothing to score against: a `BadRecordError`)."""
    samples = load_samples(path, root=root, check_media=check_media)
    for s in samples:
        if not s.turns or s.turns[-1].role != "assistant":
            raise BadRecordError(
                path,
                s.id,
                "its last turn is not an assistant answer to score against",
                "end each record with the expected answer (an assistant turn)",
            )
        s.meta["answer"] = s.turns.pop().text
    return samples


def parse(output: str, meta: Mapping | None = None) -> str:
    """The answer as compared: `normalize_answer(output)`."""
    return normalize_answer(output)


def is_correct(parsed: str, meta: Mapping) -> bool:
    return parsed == normalize_answer(meta["answer"])


class ChatAccuracy(GroupedMean):
    """Exact-match accuracy ×100 over every record (`accuracy`) and per record `task`."""

    def __init__(self, tasks: Sequence[str] = (ALL,)):
        """
        Args:
            tasks: the `task` values records may have ("" for records without one).
        """
        super().__init__(tasks)

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add `parse` outputs with their records' `meta` (needs `answer`; `task` if any)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add(str(meta.get("task") or ALL), is_correct(pred, meta))

    def compute(self) -> dict:
        """`accuracy` over every record, and one entry per task."""
        per_task = {k: v for k, v in self._per_group().items() if k != ALL}
        return {"accuracy": self._overall(), **per_task}


def _tasks(samples: list[Sample]) -> dict:
    return {"tasks": sorted({str(s.meta.get("task") or ALL) for s in samples})}


BENCHMARK = Benchmark(
    ChatAccuracy,
    lambda p, m, metric: float(is_correct(p, m)),
    "accuracy",
    metric_args=_tasks,
    local="any chat file (Mantis or LLaVA json/jsonl), e.g. lmm synth's data/synthetic/test.json",
)
