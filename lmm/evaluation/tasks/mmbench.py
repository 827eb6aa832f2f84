"""MMBench: reader (with circular copies), VLMEvalKit's exact-matching parse and CircularEval.

Circular copies of question g have index g + k·1e6 with the options rotated; a group scores only
if every copy parses and is right (VLMEvalKit `mcq_circular_eval`). Parsing is VLMEvalKit's
`can_infer` with no GPT judge: a lone option letter, else a lone option text; anything else is
wrong (VLMEvalKit's "Z"). lmms-eval's `mcq_extract` fallback, which also accepts answers such as
"C because A is wrong", is not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.tasks._base import LETTER, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer
from lmm.evaluation.tasks._choices import UPPER, dotted_options, vlmeval_choice

GROUP_STRIDE = 1_000_000
PromptStyle = Literal["llava", "lmms_eval", "vlmevalkit"]


def _missing(value) -> bool:
    # MMBench comes from pandas TSVs: a missing cell is NaN, "nan" or empty.
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def prompt(
    question: str, options: Sequence[str], hint: str = "", style: PromptStyle = "llava"
) -> str:
    """The question with its options in LLaVA's (default), lmms-eval's or VLMEvalKit's layout."""
    opts = dotted_options(options)
    if style == "llava":
        head = f"{hint}\n{question}" if hint else question
        return f"{head}\n{opts}{LETTER}"
    if style == "lmms_eval":
        head = f"{hint} {question}" if hint else question
        return f"{head} There are several options:\n{opts}{LETTER}"
    if style == "vlmevalkit":
        head = f"Hint: {hint}\n" if hint else ""
        return (
            f"{head}Question: {question}\nOptions:\n{opts}\n"
            "Please select the correct answer from the options above."
        )
    raise ValueError(f"unknown MMBench prompt style {style!r}")


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    circular: bool = False,
    style: PromptStyle = "llava",
    check_media: bool = True,
) -> list[Sample]:
    """Read MMBench (`index`, `question`, `hint`, `A`..., `answer`, `category`, `image`).

    `circular=True` builds the rotated copies (index g + k·1e6) of a file that holds originals only.
    """
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("index", f"#{i}"))
        index = int(field(rec, "index", path, rid, object))
        options = [rec[c] for c in UPPER if c in rec and not _missing(rec[c])]
        if len(options) < 2:
            raise BadRecordError(path, rid, f"{len(options)} options, expected at least 2")
        answer = field(rec, "answer", path, rid).strip()
        if answer not in UPPER[: len(options)]:
            raise BadRecordError(path, rid, f"answer {answer!r} is not one of the options")
        hint = "" if _missing(rec.get("hint")) else str(rec["hint"])
        question = field(rec, "question", path, rid)
        image = resolve(field(rec, "image", path, rid), root, path, rid, check_media)
        if circular and index >= GROUP_STRIDE:
            raise BadRecordError(path, rid, "already a circular copy", "read with circular=False")
        shifts = range(len(options)) if circular else [0]
        gold = UPPER.index(answer)
        for k in shifts:
            rotated = options[k:] + options[:k]
            letter = UPPER[(gold - k) % len(options)]
            meta = {
                "index": index + k * GROUP_STRIDE,
                "group": index % GROUP_STRIDE,
                "answer": letter,
                "choices": dict(zip(UPPER, rotated, strict=False)),
                "category": rec.get("category"),
                "l2_category": rec.get("l2-category"),
            }
            sid = str(index + k * GROUP_STRIDE)
            samples.append(
                image_first(sid, prompt(question, rotated, hint, style), [image], path, meta)
            )
    return samples


def parse(output: str, sample_meta: Mapping) -> str:
    """VLMEvalKit `can_infer` on the sample's options: a letter, "Z" (refusal) or "" (unparsed)."""
    return vlmeval_choice(output, sample_meta["choices"]) or ""


class MMBenchCircular(Metric):
    """MMBench CircularEval accuracy ×100 (and plain accuracy over the original copies)."""

    full_state_update = False

    def __init__(self):
        """No arguments: groups come from each sample's `meta["group"]`."""
        super().__init__()
        # One row per copy: (group, is original copy, correct).
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed letters with their samples' `meta` (needs `answer`, `group`, `index`)."""
        rows = [
            [int(m["group"]), int(int(m["index"]) < GROUP_STRIDE), int(p == m["answer"])]
            for p, m in zip(predictions, metas, strict=True)
        ]
        if rows:
            self.rows.append(torch.tensor(rows, dtype=torch.long))

    def compute(self) -> dict:
        """`circular`: groups with every copy right / groups; `vanilla`: originals right / originals."""
        rows = dim_zero_cat(self.rows) if self.rows else torch.zeros(0, 3, dtype=torch.long)
        if len(rows) == 0:
            zero = torch.tensor(0.0, dtype=torch.float64)
            return {"circular": zero, "vanilla": zero}
        groups, inverse = torch.unique(rows[:, 0], return_inverse=True)
        wrong = torch.zeros(len(groups), dtype=torch.long).index_add_(0, inverse, 1 - rows[:, 2])
        originals = rows[rows[:, 1] == 1]
        vanilla = originals[:, 2].double().mean() if len(originals) else torch.tensor(0.0)
        return {"circular": 100 * (wrong == 0).double().mean(), "vanilla": 100 * vanilla.double()}


BENCHMARK = Benchmark(MMBenchCircular, same_answer, "circular")
