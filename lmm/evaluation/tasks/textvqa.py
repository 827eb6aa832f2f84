"""TextVQA: reader and scorer (m4c `TextVQAAccuracyEvaluator`: EvalAI processor on both sides).

The rule is LLaVA's `llava/eval/eval_textvqa.py:eval_single` →
`llava/eval/m4c_evaluator.py:TextVQAAccuracyEvaluator.eval_pred_list`
(haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd), the processor of the EvalAI server.
lmms-eval's `lmms_eval/tasks/textvqa/utils.py:textvqa_process_results`
(EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3) gives the same score on
every case of tests/fixtures/official/textvqa/, so there is one rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from lmm.data.sample import Sample
from lmm.evaluation.hub import HubSource
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

    Accepts the official `TextVQA_0.5.1_val.json` (`{"data": [...]}`), a list or JSON lines.
    The image is the record's `image` path if given, else `{image_id}.jpg` under `root` (the
    official val images live in `train_images/`).
    """
    samples = []
    for i, rec in _records(path):
        rid = str(rec.get("question_id", f"#{i}"))
        question = field(rec, "question", path, rid)
        rel = rec.get("image") or f"{field(rec, 'image_id', path, rid)}.jpg"
        image = resolve(rel, root, path, rid, check_media)
        ocr = rec.get("ocr_tokens", []) if with_ocr else None
        meta = {"question_id": rec.get("question_id"), "answers": gold_answers(rec, path, rid)}
        samples.append(image_first(rid, prompt(question, ocr), [image], path, meta))
    return samples


def _records(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return list(enumerate(data["data"]))
    return list(records(path))


def parse(output: str, sample_meta: Mapping | None = None) -> str:
    """The stripped output; the metric applies the EvalAI processor to both sides."""
    return output.strip()


def TextVQAAccuracy() -> VQAAccuracy:  # noqa: N802 - a metric factory reads like a class
    """The TextVQA metric: `VQAAccuracy(mode="textvqa")` with a single "all" group."""
    return VQAAccuracy(mode="textvqa", answer_types=None, question_types=None)


BENCHMARK = Benchmark(
    TextVQAAccuracy,
    sample_score,
    "accuracy",
    local="TextVQA_0.5.1_val.json + train_images",
    hub=HubSource("lmms-lab/textvqa", "validation"),
)
