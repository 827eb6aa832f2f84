"""BLINK (val): reader, the official rule-based answer matching and the macro-averaged score.

Official: zeyofu/BLINK_Benchmark @ 2d6a779be4aa1ad0d38d7aa539bcb43b6dd81592,
`eval/test_benchmark.py:analyze_answer`: exactly "A".."E" or "(A)".."(E)", else exactly one option
token "(X)" among the words (or in the last paragraph); anything else goes to a GPT-3.5 matcher
(`eval/multiple_choice.py:match_multiple_choice`), which is not run here: such answers count as
wrong and are reported as `unparsed`. Total = unweighted mean of the 14 subtask accuracies
(`eval/evaluate.py:eval_prediction`, "Total").

`mode="lmms_eval"`: EvolvingLMMs-Lab/lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
`lmms_eval/tasks/blink/utils.py:_extract_answer_letter`: the output stripped, then
`[(\\s]*([A-Z])` matched at its start case-insensitively and upper-cased ("b" reads as B, "The
answer is (B)" as T); `blink_process_results` compares it with the gold letter. The `blink` group
averages its 14 subtask tasks unweighted (`aggregate_metric_list` without `weight_by_size`,
`lmms_eval/api/metrics.py:aggregate_subtask_metrics`), so its total is the macro mean too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import GroupedMean, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer
from lmm.evaluation.tasks._choices import letters, paren_options

SUBTASKS = (
    "Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test",
    "Jigsaw", "Multi-view_Reasoning", "Object_Localization", "Relative_Depth",
    "Relative_Reflectance", "Semantic_Correspondence", "Spatial_Relation",
    "Visual_Correspondence", "Visual_Similarity",
)  # fmt: skip
_EXACT = ("A", "B", "C", "D", "E")
_LMMS_EVAL = re.compile(r"[\(\s]*([A-Z])[\)\.\s]*", flags=re.IGNORECASE)


def prompt(question: str, choices: Sequence[str]) -> str:
    """BLINK's prompt layout, for records without a ready `prompt` field."""
    return f"{question}\nSelect from the following choices.\n{paren_options(choices)}"


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read BLINK (`idx`, `sub_task`, `question`, `choices`, `answer` "(A)", `prompt`, `image_1..4`)."""
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("idx", f"#{i}"))
        choices = field(rec, "choices", path, rid, list)
        answer = field(rec, "answer", path, rid).strip()
        if answer not in [f"({c})" for c in letters(len(choices))]:
            raise BadRecordError(
                path, rid, f"answer {answer!r} is not one of (A)..({len(choices)})"
            )
        rels = [rec[f"image_{k}"] for k in range(1, 5) if rec.get(f"image_{k}")]
        images = [resolve(r, root, path, rid, check_media) for r in rels]
        text = rec.get("prompt") or prompt(field(rec, "question", path, rid), choices)
        meta = {
            "answer": answer,
            "n_choices": len(choices),
            "sub_task": field(rec, "sub_task", path, rid),
        }
        samples.append(image_first(rid, text, images, path, meta))
    return samples


def parse(output: str, sample_meta: Mapping, mode: str = "official") -> str:
    """The chosen option as "(X)", or "" when the official rule would need the GPT matcher."""
    if mode == "lmms_eval":
        m = _LMMS_EVAL.match(output.strip())
        return f"({m.group(1).upper()})" if m else ""
    if mode != "official":
        raise ValueError(f"unknown BLINK parse mode {mode!r}; use 'official' or 'lmms_eval'")
    options = {f"({c})" for c in letters(int(sample_meta["n_choices"]))}
    if output in _EXACT:
        return f"({output})"
    if output in {f"({c})" for c in _EXACT}:
        return output
    hits = options & set(output.split())
    hits_last = options & set(output.split("\n\n")[-1].split())
    if (len(hits) != 1 and len(hits_last) != 1) or not hits:
        return ""
    return next(iter(hits_last if len(hits_last) == 1 else hits))


class BLINKAccuracy(GroupedMean):
    """BLINK accuracy ×100 per subtask, macro (both harnesses' total) and sample-weighted totals."""

    def __init__(
        self,
        mode: Literal["official", "lmms_eval"] = "official",
        subtasks: Sequence[str] = SUBTASKS,
    ):
        """
        Args:
            mode: the harness ("official" or "lmms_eval"); both report the mean of the subtask
                accuracies as `accuracy` (lmms-eval's `blink` group is unweighted).
            subtasks: the `sub_task` names to report.
        """
        super().__init__(subtasks)
        self.mode = mode
        self.add_state("unparsed", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed "(X)" answers with their samples' `meta` (needs `answer`, `sub_task`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self.unparsed += int(pred == "")
            self._add(meta["sub_task"], pred == meta["answer"])

    def compute(self) -> dict:
        """`accuracy` (per mode), `macro`, `micro`, `unparsed` count and one entry per subtask."""
        macro, micro = self._macro(), self._overall()
        return {
            "accuracy": macro,
            "macro": macro,
            "micro": micro,
            "unparsed": self.unparsed,
            **self._per_group(),
        }


BENCHMARK = Benchmark(
    BLINKAccuracy,
    same_answer,
    "accuracy",
    local="the val split as JSON lines + images",
    hub=HubSource("BLINK-Benchmark/BLINK", "val", subsets=SUBTASKS),
)
