"""TextVQA: reader and scorer (m4c `TextVQAAccuracyEvaluator`: EvalAI processor on both sides).

LLaVA's `eval_textvqa.py` and lmms-eval agree here (EVAL.md), so there is one rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lmm.data.sample import Sample
from lmm.evaluation.tasks._base import SWP, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks.vqav2 import VQAAccuracy, gold_answers, sample_score

OCR_LINE = "\nReference OCR token: {tokens}"


def prompt(question: str, ocr_tokens: list[str] | None = None) -> str:
    """Question (+ LLaVA's optional OCR-token line) + "Answer the question using a single word or phrase."."""
    ocr = OCR_LINE.format(tokens=", ".join(ocr_tokens)) if ocr_tokens is not None else ""
    return question + ocr + SWP


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    with_ocr: bool = False,
    check_media: bool = True,
) -> list[Sample]:
    """Read TextVQA (`question_id`, `question`, `image_id`, `answers`, `ocr_tokens`).

    The image is the record's `image` path if given, else `{image_id}.jpg` under `root`.
    """
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("question_id", f"#{i}"))
        question = field(rec, "question", path, rid)
        rel = rec.get("image") or f"{field(rec, 'image_id', path, rid)}.jpg"
        image = resolve(rel, root, path, rid, check_media)
        ocr = rec.get("ocr_tokens", []) if with_ocr else None
        meta = {"question_id": rec.get("question_id"), "answers": gold_answers(rec, path, rid)}
        samples.append(image_first(rid, prompt(question, ocr), [image], path, meta))
    return samples


def parse(output: str, sample_meta: Mapping | None = None) -> str:
    """The stripped output; the metric applies the EvalAI processor to both sides."""
    return output.strip()


def TextVQAAccuracy() -> VQAAccuracy:  # noqa: N802 - a metric factory reads like a class
    """The TextVQA metric: `VQAAccuracy(mode="textvqa")` with a single "all" group."""
    return VQAAccuracy(mode="textvqa", answer_types=None, question_types=None)


BENCHMARK = Benchmark(TextVQAAccuracy, sample_score, "accuracy")
