"""VQAv2: reader, LLaVA's answer processor and the official soft accuracy (also used by TextVQA).

Default pipeline (EVAL.md): `parse` applies LLaVA's `EvalAIAnswerProcessor`
(haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd, `llava/eval/m4c_evaluator.py`), as
`scripts/convert_vqav2_for_submission.py` does before the upload, and `VQAAccuracy()` is the
official `VQAEval.evaluate` the test server runs (GT-Vision-Lab/VQA@a013f0043c1e2cdc995922dfe257f7149aa9af06,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`), quirk included: answers are normalised only
when the ten humans disagree, so a raw "Yes" against a unanimous "yes" scores 0. It reports
`accuracy`, one key per answer type (`perAnswerType`) and `question_type/<type>` per question
type (`perQuestionType`), unrounded (the official code rounds to 2 digits).

Other pipelines:
- official code on raw text: `parse(..., mode="raw")` + `VQAAccuracy()`.
- lmms-eval (EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
  `lmms_eval/tasks/vqav2/utils.py:vqav2_process_results`): `parse(..., mode="raw")` +
  `VQAAccuracy(mode="lmms_eval")`: prediction and answers always normalised, no `word_tokenize`,
  so "man's" keeps its credit.
- TextVQA / m4c: `VQAAccuracy(mode="textvqa")`, the processor on prediction and every answer.

Parity: tests/fixtures/official/vqav2/{official,official_raw,lmms_eval}.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from torchmetrics import Metric

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import SWP, GroupedMean, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks._normalize import evalai_answer, normalize_vqa

ANSWER_TYPES = ("yes/no", "number", "other")
# GT-Vision-Lab/VQA QuestionTypes/mscoco_question_types.txt: the `question_type` of every COCO
# annotation (the abstract-scenes types differ: pass them as `question_types`).
QUESTION_TYPES = (
    "how many", "is the", "what", "what color is the", "what is the", "is this", "is this a",
    "what is", "are the", "what kind of", "is there a", "what type of", "is it", "what are the",
    "where is the", "is there", "does the", "what color are the", "are these", "are there",
    "which", "is", "what is the man", "is the man", "are", "how", "does this", "what is on the",
    "what does the", "how many people are", "what is in the", "what is this", "do", "what are",
    "are they", "what time", "what sport is", "are there any", "is he", "what color is", "why",
    "where are the", "what color", "who is", "what animal is", "is the woman", "is this an",
    "do you", "how many people are in", "what room is", "has", "is this person",
    "what is the woman", "can you", "why is the", "is the person", "what is the color of the",
    "what is the person", "could", "was", "is that a", "what number is", "what is the name",
    "what brand", "none of the above",
)  # fmt: skip
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


def _official_pair(path: Path, data: dict, annotations: str | Path | None) -> list[dict]:
    """Records of the official questions file (`{"questions": [...], "data_subtype"}`) merged
    with its annotations file by `question_id`."""
    anns: dict = {}
    if annotations is not None:
        ann_path = Path(annotations)
        if not ann_path.is_absolute():
            ann_path = path.parent / ann_path
        if not ann_path.is_file():
            raise FileNotFoundError(f"{path}: annotations file {ann_path} does not exist")
        anns = {
            a["question_id"]: a
            for a in json.loads(ann_path.read_text(encoding="utf-8"))["annotations"]
        }
    subtype = data.get("data_subtype", "val2014")
    out = []
    for q in data["questions"]:
        image = f"COCO_{subtype}_{int(q.get('image_id', -1)):012d}.jpg"
        out.append({"image": image, **anns.get(q.get("question_id"), {}), **q})
    return out


def _records(path: str | Path, annotations: str | Path | None) -> list[tuple[int, dict]]:
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "questions" in data:
            return list(enumerate(_official_pair(path, data, annotations)))
    if annotations is not None:
        raise ValueError(f"{path}: `annotations` goes with the official questions file only")
    return list(records(path))


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    annotations: str | Path | None = None,
    check_media: bool = True,
) -> list[Sample]:
    """Read VQAv2: the official pair or merged records (`question_id`, `question`, `image`, `answers`).

    The official pair is the questions file (`v2_OpenEnded_mscoco_val2014_questions.json`,
    `{"questions": [{question_id, image_id, question}], "data_subtype"}`) given as `path` and
    the annotations file (`v2_mscoco_val2014_annotations.json`) as `annotations` (relative to the
    questions file's folder); images are `COCO_{data_subtype}_{image_id:012d}.jpg` under `root`.
    Without annotations (test-dev) the samples have no answers and score nothing.
    """
    samples = []
    for i, rec in _records(path, annotations):
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
        # vqav2_process_results normalises both sides, whatever the humans said.
        pred, gts = normalize_vqa(pred), [normalize_vqa(a) for a in gts]
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
    """VQA soft accuracy ×100, overall, per answer type and per question type."""

    def __init__(
        self,
        mode: VQAMode = "official",
        answer_types: Sequence[str] | None = ANSWER_TYPES,
        question_types: Sequence[str] | None = QUESTION_TYPES,
    ):
        """
        Args:
            mode: "official" (vqaEval.py, normalise only when humans disagree), "lmms_eval"
                (always normalise both sides) or "textvqa" (EvalAI processor on both sides).
            answer_types: the `answer_type` values to report; None scores everything as "all".
            question_types: the `question_type` values to report as `question_type/<type>`
                (default: the COCO list); None reports none. Samples without one are left out.
        """
        groups = list(answer_types) if answer_types else ["all"]
        self._qt_offset = len(groups)
        groups += [f"question_type/{t}" for t in question_types or ()]
        super().__init__(groups)
        self.mode = mode
        self._by_type = bool(answer_types)
        self._by_question_type = bool(question_types)

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed predictions with their samples' `meta` (needs `answers`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            answers = meta.get("answers")
            if not answers:
                raise ValueError(f"question {meta.get('question_id')!r} has no gold answers")
            group = meta.get("answer_type", "other") if self._by_type else "all"
            score = vqa_score(pred, answers, self.mode)
            self._add(group, score)
            qtype = meta.get("question_type")
            if self._by_question_type and qtype is not None:
                self._add(f"question_type/{qtype}", score)

    def compute(self) -> dict:
        """`accuracy` overall, one entry per answer type and `question_type/<type>` seen."""
        answer_groups = self.groups[: self._qt_offset]
        sums, counts = self.sums[: self._qt_offset], self.counts[: self._qt_offset]
        out = {"accuracy": 100 * sums.sum() / counts.sum().clamp(min=1)}
        per_group = self._per_group()
        if not self._by_type:
            per_group = {k: v for k, v in per_group.items() if k not in answer_groups}
        out.update(per_group)
        return out


def sample_score(parsed: str, sample_meta: Mapping, metric: Metric) -> float | None:
    """One sample's VQA soft score in [0, 1] under the metric's `mode`; None without answers."""
    answers = sample_meta.get("answers")
    return vqa_score(parsed, answers, getattr(metric, "mode", "official")) if answers else None


BENCHMARK = Benchmark(
    VQAAccuracy,
    sample_score,
    "accuracy",
    local="the official questions + annotations pair, or merged JSON lines; COCO val2014",
    hub=HubSource("lmms-lab/VQAv2", "validation"),
)
