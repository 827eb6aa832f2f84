"""POPE: reader, the official yes/no rule and accuracy/precision/recall/F1/yes-ratio per split.

Official (POPE `evaluate.py` = LLaVA `eval_pope.py`): keep the text before the first ".", drop
commas, split on single spaces; any word "No"/"not"/"no" means "no", anything else "yes"
(so "NO", "Nope", "Not sure" and "" are read as **yes**). Positive class = yes.
`mode="lmms_eval"`: the lower-cased output must be exactly "yes"/"no"; precision and recall
ignore other outputs, and its yes-ratio is the share of *gold* yes (its bug, kept for comparison).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torchmetrics import Metric

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.tasks._base import SWP, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer

SPLITS = ("adversarial", "popular", "random")
PROMPT = "{question}" + SWP
# Columns of the per-split count table.
_TP, _FP, _TN, _FN, _OTHER_POS, _OTHER_NEG = range(6)


def prompt(question: str) -> str:
    """The question followed by "Answer the question using a single word or phrase."."""
    return PROMPT.format(question=question)


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    category: str | None = None,
    check_media: bool = True,
) -> list[Sample]:
    """Read POPE (`question_id`, `question`|`text`, `image`|`image_source`, `category`, `answer`|`label`).

    `image_source` (a COCO name without extension) becomes `{image_source}.jpg` under `root`;
    `category` fills in the split when the records do not carry one (LLaVA's per-split files).
    """
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("question_id", f"#{i}"))
        question = field(rec, ("question", "text"), path, rid)
        answer = field(rec, ("answer", "label"), path, rid).strip().lower()
        if answer not in ("yes", "no"):
            raise BadRecordError(path, rid, f"answer {answer!r} is not yes/no")
        split = rec.get("category", category)
        if split is None:
            raise BadRecordError(path, rid, "no 'category'", "pass category= for a one-split file")
        rel = rec.get("image") or f"{field(rec, 'image_source', path, rid)}.jpg"
        image = resolve(rel, root, path, rid, check_media)
        meta = {"answer": answer, "category": split}
        samples.append(image_first(rid, prompt(question), [image], path, meta))
    return samples


def parse(output: str, sample_meta: Mapping | None = None, mode: str = "official") -> str:
    """ "yes"/"no" by the official keyword rule, or lmms-eval's lower-cased stripped output."""
    if mode == "official":
        text = output.split(".")[0] if "." in output else output
        words = text.replace(",", "").split(" ")
        return "no" if any(w in ("No", "not", "no") for w in words) else "yes"
    if mode == "lmms_eval":
        return output.lower().strip()
    raise ValueError(f"unknown POPE parse mode {mode!r}; use 'official' or 'lmms_eval'")


class POPEMetrics(Metric):
    """POPE accuracy, precision, recall, F1 (positive = yes) and yes-ratio per split, ×100."""

    full_state_update = False

    def __init__(
        self, mode: Literal["official", "lmms_eval"] = "official", splits: Sequence[str] = SPLITS
    ):
        """
        Args:
            mode: "official" (LLaVA/POPE formulas) or "lmms_eval" (non-yes/no outputs are wrong
                and left out of precision/recall; yes-ratio counts gold yes).
            splits: the `category` values (POPE splits) to report.
        """
        super().__init__()
        self.mode = mode
        self.splits = list(splits)
        self._index = {s: i for i, s in enumerate(self.splits)}
        self.add_state(
            "counts", torch.zeros(len(self.splits), 6, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed predictions with their samples' `meta` (needs `answer`, `category`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            split = meta["category"]
            if split not in self._index:
                raise ValueError(f"POPE split {split!r} not in {self.splits}")
            gold_yes = meta["answer"] == "yes"
            if pred == "yes":
                col = _TP if gold_yes else _FP
            elif pred == "no":
                col = _FN if gold_yes else _TN
            else:
                col = _OTHER_POS if gold_yes else _OTHER_NEG
            self.counts[self._index[split], col] += 1

    def _scores(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        c = c.double()
        tp, fp, tn, fn = c[_TP], c[_FP], c[_TN], c[_FN]
        total = c.sum()
        precision = tp / (tp + fp) if tp + fp > 0 else torch.tensor(0.0, dtype=torch.float64)
        recall = tp / (tp + fn) if tp + fn > 0 else torch.tensor(0.0, dtype=torch.float64)
        pr = precision + recall
        f1 = 2 * precision * recall / pr if pr > 0 else torch.tensor(0.0, dtype=torch.float64)
        if self.mode == "lmms_eval":
            yes = tp + fn + c[_OTHER_POS]  # gold yes: lmms-eval's yes-ratio bug
        else:
            yes = tp + fp
        return {
            "accuracy": 100 * (tp + tn) / total,
            "precision": 100 * precision,
            "recall": 100 * recall,
            "f1": 100 * f1,
            "yes_ratio": 100 * yes / total,
        }

    def compute(self) -> dict:
        """`{split}/{accuracy,precision,recall,f1,yes_ratio}` plus `f1`/`accuracy` means over splits."""
        out: dict[str, torch.Tensor] = {}
        f1s, accs = [], []
        for i, split in enumerate(self.splits):
            if self.counts[i].sum() == 0:
                continue
            scores = self._scores(self.counts[i])
            out.update({f"{split}/{k}": v for k, v in scores.items()})
            f1s.append(scores["f1"])
            accs.append(scores["accuracy"])
        if f1s:
            out["f1"] = torch.stack(f1s).mean()
            out["accuracy"] = torch.stack(accs).mean()
        return out


BENCHMARK = Benchmark(POPEMetrics, same_answer, "f1")
