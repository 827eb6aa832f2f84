"""Mantis-Eval: reader, Mantis prompts and `get_prediction` scoring.

Official scorer: TIGER-AI-Lab/Mantis @ f3a319202d882a1794d28440b77bba7c58869a9e,
`mantis/benchmark/eval.py`: `parse_answer`, `get_option`, `get_prediction`; `main` prints the
accuracy overall and per question type (multi-choice, short-answer), here ×100.

Multi-choice: strip up to "final answer:" / "the answer is" / "answer:", take "Answer: X" or the
first alphabetic character as the letter if it is a valid option ("cat" -> C, as in Mantis);
otherwise the raw text must equal the gold option's text (after its "X." / "X:" / "(X)" label,
the gold letter's case as written). Short answers: case-insensitive equality after the prefix
strip, the output otherwise unstripped (" 2" is not "2"). NLVR2 (`nlvr2.py`) adds a true/false
keyword fallback. Parity: `tests/fixtures/official/mantis_eval/official.json`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lmm.data.sample import IMAGE_MARKER, BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import (
    GroupedMean,
    embedded_image,
    field,
    interleaved,
    resolve,
    table_records,
)
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks._choices import letters, mantis_choice, mantis_option, mantis_strip

MULTI_CHOICE = "{question}\nAnswer with the option's letter from the given choices directly."
SHORT_ANSWER = (
    "Given the images, answer the following short answer vqa question:\nQ: {question}\n"
    'You can first give your analysis, and then give your final answer as "Final Answer:"'
)
QUESTION_TYPES = ("multi-choice", "short-answer")
IMAGE = IMAGE_MARKER


def prompt(question: str, question_type: str, options: Sequence[str] = ()) -> str:
    """Mantis's template; options are listed as `\\n (A) text` unless they carry their letter."""
    if question_type == "short-answer":
        return SHORT_ANSWER.format(question=question)
    for c, option in zip(letters(len(options)), options, strict=True):
        labelled = any(f"{c}{x}" in option.upper() for x in (")", ":", "."))
        question += f"\n {option}" if labelled else f"\n ({c}) {option}"
    return MULTI_CHOICE.format(question=question)


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read Mantis eval items (`id`, `question_type`, `question`, `options`, `answer`, `images`).

    Both forms `eval.py` reads: the Hugging Face shards (`mantis_eval/test-*.parquet` of
    TIGER-Lab/Mantis-Eval, `nlvr2/test-*.parquet` of TIGER-Lab/NLVR2), whose embedded images are
    written once to `{stem}_images/` beside the shard, and a local JSON list whose image paths
    are relative to `root` (default: the JSON's folder). Missing `<image>` markers are added at
    the start of the question, as Mantis does.
    """
    samples = []
    cache = Path(path).parent / f"{Path(path).stem}_images"
    for i, rec in table_records(path):
        rid = str(rec.get("id", f"#{i}"))
        qtype = field(rec, "question_type", path, rid)
        if qtype not in QUESTION_TYPES:
            raise BadRecordError(path, rid, f"question_type {qtype!r} not in {QUESTION_TYPES}")
        options = list(rec.get("options") or [])
        answer = str(field(rec, "answer", path, rid, object))
        if qtype == "multi-choice" and len(options) < 2:
            raise BadRecordError(path, rid, f"multi-choice with {len(options)} options")
        cells = rec.get("images") or []
        images = [
            resolve(embedded_image(c, cache, f"{rid}_{k}"), root, path, rid, check_media)
            for k, c in enumerate(cells)
        ]
        text = prompt(field(rec, "question", path, rid), qtype, options)
        text = IMAGE * max(0, len(images) - text.count(IMAGE)) + text
        meta = {
            "answer": answer,
            "options": options,
            "question_type": qtype,
            "category": rec.get("category"),
            "data_source": rec.get("data_source"),
        }
        samples.append(interleaved(rid, text, images, path, meta, IMAGE))
    return samples


def parse(output: str, sample_meta: Mapping) -> str:
    """Multi-choice: a valid letter, else the raw text; short answer: the text after the prefix."""
    if sample_meta["question_type"] == "multi-choice":
        return mantis_choice(output, len(sample_meta["options"]))
    return mantis_strip(output)


def reference_letter(answer: str) -> str:
    """The gold letter as `get_prediction` reads it: strip `()` and blanks, else its first letter.

    Its case is kept: the option-text comparison looks for the gold letter as written ("b. small"
    for gold "b"), only the letter comparison upper-cases it.
    """
    ref = answer.strip("()\n ")
    if len(ref) != 1:
        ref = next((c for c in ref if c.isalpha()), ref)
    return ref


def choice_correct(raw: str, answer: str, options: Sequence[str], nlvr2: bool = False) -> bool:
    """`get_prediction(...)["correct"]` of a multi-choice question (Mantis f3a3192, eval.py)."""
    ref = reference_letter(answer)
    option = mantis_option(mantis_strip(raw))
    if option and ord(option) - ord("A") < len(options):
        return option == ref.upper()
    # No valid letter: the raw text itself is compared (idempotent on `parse` output).
    idx = ord(ref.upper()) - ord("A")
    if not 0 <= idx < len(options):
        return False
    gold = options[idx]
    if nlvr2:
        low, g = raw.lower(), gold.lower()
        says_true = "true" in low and "false" not in low
        says_false = "false" in low and "true" not in low
        return (says_true and "true" in g) or (says_false and "false" in g)
    for head in (ref + ".", ref + ":"):
        if gold.startswith(head):
            return raw.strip() == gold[len(head) :].strip()
    if gold.startswith(f"({ref})"):
        return raw.strip() == gold[len(ref) + 2 :].strip()
    return raw.strip() == gold.strip()


def is_correct(parsed: str, sample_meta: Mapping, nlvr2: bool = False) -> bool:
    """Mantis `get_prediction(...)["correct"]` on a `parse` output."""
    if sample_meta["question_type"] == "multi-choice":
        return choice_correct(parsed, sample_meta["answer"], sample_meta["options"], nlvr2)
    return parsed.lower() == sample_meta["answer"].strip("()\n ").lower()


class MantisAccuracy(GroupedMean):
    """Accuracy ×100 overall and per question type (multi-choice, short-answer)."""

    def __init__(self, nlvr2: bool = False):
        """
        Args:
            nlvr2: use Mantis's NLVR2 fallback (one of "true"/"false" in the raw answer).
        """
        super().__init__(QUESTION_TYPES)
        self.nlvr2 = nlvr2

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add `parse` outputs with their samples' `meta` (needs `answer`, `options`, `question_type`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add(meta["question_type"], is_correct(pred, meta, self.nlvr2))

    def compute(self) -> dict:
        """`accuracy` overall plus `multi-choice` / `short-answer` when present."""
        return {"accuracy": self._overall(), **self._per_group()}


BENCHMARK = Benchmark(
    MantisAccuracy,
    lambda p, m, metric: float(is_correct(p, m, getattr(metric, "nlvr2", False))),
    "accuracy",
    local="mantis_eval_test.json + images, or the hub shards mantis_eval/test-*.parquet",
    hub=HubSource("TIGER-Lab/Mantis-Eval", "test", subset="mantis_eval"),
)
