"""VQAv2: reader, LLaVA's answer processor and the official soft accuracy (also used by TextVQA).

Default pipeline (EVAL.md): `parse` applies LLaVA's `EvalAIAnswerProcessor`, as
`convert_vqav2_for_submission.py` does before the upload, and `VQAAccuracy()` is the official
`vqaEval.py` the test server runs, quirk included: answers are normalised only when the ten
humans disagree, so a raw "Yes" against a unanimous "yes" scores 0.

Other pipelines:
- official code on raw text: `parse(..., mode="raw")` + `VQAAccuracy()`.
- lmms-eval: `parse(..., mode="raw")` + `VQAAccuracy(mode="lmms_eval")` (prediction always
  normalised, no `word_tokenize`, so "man's" keeps its credit).
- TextVQA / m4c: `VQAAccuracy(mode="textvqa")`, the processor on prediction and every answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from torchmetrics import Metric

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.tasks._base import SWP, GroupedMean, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks._normalize import evalai_answer, normalize_vqa

ANSWER_TYPES = ("yes/no", "number", "other")
PROMPT = "{question}" + SWP

VQAMode = Literal["official", "lmms_eval", "textvqa"]


def prompt(question: str) -> str:
    """The question followed by "Answer the question using a single word or phrase."."""
    return PROMPT.format(question=question)


def gold_answers(rec: Mapping, source: str | Path, rid: str) -> list[str] | None:
    """The human answers as strings (VQAv2 dicts or plain strings); None if the split has none."""
    answers = rec.get("answers")
    if answers is None:
        return None
    if not isinstance(answers, list) or not answers:
        raise BadRecordError(source, rid, "'answers' is not a non-empty list")
    out = []
    for a in answers:
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise BadRecordError(source, rid, f"answer {a!r} has no text")
        out.append(text)
    return out


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read VQAv2 questions merged with annotations (`question_id`, `question`, `image`, `answers`)."""
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("question_id", f"#{i}"))
        question = field(rec, "question", path, rid)
        image = resolve(field(rec, "image", path, rid), root, path, rid, check_media)
        meta = {
            "question_id": rec.get("question_id"),
            "answers": gold_answers(rec, path, rid),
            "answer_type": rec.get("answer_type", "other"),
            "question_type": rec.get("question_type"),
            "multiple_choice_answer": rec.get("multiple_choice_answer"),
        }
        samples.append(image_first(rid, prompt(question), [image], path, meta))
    return samples


def parse(output: str, sample_meta: Mapping | None = None, mode: str = "llava") -> str:
    """The answer to submit: LLaVA's EvalAI processor (`mode="llava"`) or the stripped text ("raw")."""
    if mode == "llava":
        return evalai_answer(output)
    if mode == "raw":
        return output.strip()
    raise ValueError(f"unknown VQAv2 parse mode {mode!r}; use 'llava' or 'raw'")


def vqa_score(prediction: str, answers: Sequence[str], mode: VQAMode = "official") -> float:
    """Soft accuracy of one answer: mean over leave-one-out subsets of min(#matches / 3, 1)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")

    def clean(t: str) -> str:
        return t.replace("\n", " ").replace("\t", " ").strip()

    pred, gts = clean(prediction), [clean(a) for a in answers]
    if mode == "textvqa":
        pred, gts = evalai_answer(pred), [evalai_answer(a) for a in gts]
    elif mode == "lmms_eval":
        pred = normalize_vqa(pred)
        if len(set(gts)) > 1:
            gts = [normalize_vqa(a) for a in gts]
    elif mode == "official":
        # The official quirk: nothing is normalised when the humans agree.
        if len(set(gts)) > 1:
            gts = [normalize_vqa(a) for a in gts]
            pred = normalize_vqa(pred)
    else:
        raise ValueError(f"unknown VQA mode {mode!r}; use 'official', 'lmms_eval' or 'textvqa'")
    # Leave-one-out by position: the official code compares answer dicts made unique by answer_id.
    total = 0.0
    for i in range(len(gts)):
        matches = sum(a == pred for j, a in enumerate(gts) if j != i)
        total += min(1.0, matches / 3)
    return total / len(gts)


class VQAAccuracy(GroupedMean):
    """VQA soft accuracy ×100, overall and per answer type."""

    def __init__(
        self, mode: VQAMode = "official", answer_types: Sequence[str] | None = ANSWER_TYPES
    ):
        """
        Args:
            mode: "official" (vqaEval.py, normalise only when humans disagree), "lmms_eval"
                (always normalise the prediction) or "textvqa" (EvalAI processor on both sides).
            answer_types: the `answer_type` values to report; None scores everything as "all".
        """
        super().__init__(list(answer_types) if answer_types else ["all"])
        self.mode = mode
        self._by_type = bool(answer_types)

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed predictions with their samples' `meta` (needs `answers`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            answers = meta.get("answers")
            if not answers:
                raise ValueError(f"question {meta.get('question_id')!r} has no gold answers")
            group = meta.get("answer_type", "other") if self._by_type else "all"
            self._add(group, vqa_score(pred, answers, self.mode))

    def compute(self) -> dict:
        """`accuracy` overall, plus one entry per answer type seen."""
        out = {"accuracy": self._overall()}
        if self._by_type:
            out.update(self._per_group())
        return out


def sample_score(parsed: str, sample_meta: Mapping, metric: Metric) -> float | None:
    """One sample's VQA soft score in [0, 1] under the metric's `mode`; None without answers."""
    answers = sample_meta.get("answers")
    return vqa_score(parsed, answers, getattr(metric, "mode", "official")) if answers else None


BENCHMARK = Benchmark(VQAAccuracy, sample_score, "accuracy")
