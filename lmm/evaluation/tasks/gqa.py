"""GQA testdev-balanced: reader and accuracy (official `eval.py`: prediction == gold).

Default pipeline: `parse` applies LLaVA's `convert_gqa_for_eval.py` step (`rstrip('.').lower()`),
then `GQAAccuracy()` checks exact equality as the official `eval.py` does.
lmms-eval: `parse(..., mode="raw")` + `GQAAccuracy(mode="lmms_eval")`, which deletes every ASCII
punctuation character and ignores case on both sides ("t-shirt" == "tshirt", "yes," == "yes").
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from lmm.data.sample import Sample
from lmm.evaluation.tasks._base import SWP, GroupedMean, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark

PROMPT = "{question}" + SWP
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def prompt(question: str) -> str:
    """The question followed by "Answer the question using a single word or phrase."."""
    return PROMPT.format(question=question)


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read GQA questions (`question_id`, `question`, `imageId`, `answer`, `fullAnswer`).

    Accepts a list/JSON-lines of records or GQA's own `{question_id: record}` object. The image is
    the record's `image` if given, else `{imageId}.jpg` under `root`.
    """
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("question_id", rec.get("_key", f"#{i}")))
        question = field(rec, "question", path, rid)
        rel = rec.get("image") or f"{field(rec, 'imageId', path, rid)}.jpg"
        image = resolve(rel, root, path, rid, check_media)
        meta = {"answer": field(rec, "answer", path, rid), "full_answer": rec.get("fullAnswer")}
        samples.append(image_first(rid, prompt(question), [image], path, meta))
    return samples


def parse(output: str, sample_meta: Mapping | None = None, mode: str = "llava") -> str:
    """LLaVA's conversion (`strip().rstrip('.').lower()`, `mode="llava"`) or the stripped text ("raw")."""
    if mode == "llava":
        return output.strip().rstrip(".").lower()
    if mode == "raw":
        return output.strip()
    raise ValueError(f"unknown GQA parse mode {mode!r}; use 'llava' or 'raw'")


def gqa_correct(prediction: str, gold: str, mode: str = "official") -> bool:
    """Exact match ("official") or lmms-eval's case- and punctuation-blind match ("lmms_eval")."""
    if mode == "official":
        return prediction == gold
    if mode == "lmms_eval":
        return prediction.lower().translate(_NO_PUNCT) == gold.lower().translate(_NO_PUNCT)
    raise ValueError(f"unknown GQA mode {mode!r}; use 'official' or 'lmms_eval'")


class GQAAccuracy(GroupedMean):
    """GQA accuracy ×100."""

    def __init__(self, mode: Literal["official", "lmms_eval"] = "official"):
        """
        Args:
            mode: "official" (exact equality) or "lmms_eval" (ignore case and punctuation).
        """
        super().__init__(["all"])
        self.mode = mode

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed predictions with their samples' `meta` (needs `answer`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add("all", gqa_correct(pred, meta["answer"], self.mode))

    def compute(self) -> dict:
        """`accuracy` ×100."""
        return {"accuracy": self._overall()}


BENCHMARK = Benchmark(
    GQAAccuracy,
    lambda p, m, metric: float(gqa_correct(p, m["answer"], getattr(metric, "mode", "official"))),
    "accuracy",
)
