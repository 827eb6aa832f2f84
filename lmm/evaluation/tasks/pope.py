"""POPE: reader, the official yes/no rule and accuracy/precision/recall/F1/yes-ratio per split.

Official (`llava/eval/eval_pope.py:eval_pope`, haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd,
the rule of AoiDragon/POPE@08d957b917e5a378a2f99d35b6293c536a66298b `evaluate.py`): keep the text
before the first ".", drop commas, split on single spaces; any word "No"/"not"/"no" means "no",
anything else "yes" (so "NO", "Nope", "Not sure" and "" are read as **yes**). Positive class =
yes. Per split it prints TP/FP/TN/FN and the scores: `{split}/{tp,fp,tn,fn}` and
`{split}/{accuracy,precision,recall,f1,yes_ratio}`; `f1` and `accuracy` are their means over the
splits (the LLaVA-1.5 table).

`mode="lmms_eval"` (EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
`lmms_eval/tasks/pope/utils.py:pope_process_results` and `pope_aggregate_*`): the lower-cased
output must be exactly "yes"/"no"; precision and recall ignore other outputs, and its yes-ratio
is the share of *gold* yes (its bug, kept for comparison). `{split}/*` are its per-split tasks
(`pope_adv`, `pope_pop`, `pope_random`) and the top-level keys its `pope` task (splits pooled).

Parity: tests/fixtures/official/pope/{official,lmms_eval}.json.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torchmetrics import Metric

from lmm.data.formats import read_records
from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import SWP, field, image_first, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer

SPLITS = ("adversarial", "popular", "random")
_FILE_SPLIT = re.compile(r"_pope_(?:seem_)?(adversarial|popular|random)\.jsonl?$")
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
    `category` fills in the split when the records do not carry one. The published per-split
    files (`coco_pope_random.json`, `aokvqa_pope_seem_popular.json`) name their split: their
    question ids restart in each file, so their samples are `{split}/{question_id}`.
    """
    named = _FILE_SPLIT.search(Path(path).name)
    from_name = category is None and named is not None
    if from_name:
        category = named.group(1)
    samples = []
    for i, rec in read_records(path):
        if isinstance(rec, BadRecordError):
            raise rec
        rid = str(rec.get("question_id", f"#{i}"))
        if from_name and "category" not in rec:
            rid = f"{category}/{rid}"
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
        # eval_pope reads the answer file, which holds the stripped generation (model_vqa_loader).
        output = output.strip()
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
        zero = torch.tensor(0.0, dtype=torch.float64)
        precision = tp / (tp + fp) if tp + fp > 0 else zero
        recall = tp / (tp + fn) if tp + fn > 0 else zero
        pr = precision + recall
        f1 = 2 * precision * recall / pr if pr > 0 else zero
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
        """Per split `{split}/{tp,fp,tn,fn,accuracy,precision,recall,f1,yes_ratio}`; official:
        `f1`/`accuracy` means over splits; lmms-eval: the five scores on all splits pooled."""
        out: dict[str, torch.Tensor] = {}
        f1s, accs = [], []
        for i, split in enumerate(self.splits):
            if self.counts[i].sum() == 0:
                continue
            counts = self.counts[i]
            for name, col in (("tp", _TP), ("fp", _FP), ("tn", _TN), ("fn", _FN)):
                out[f"{split}/{name}"] = counts[col]
            scores = self._scores(counts)
            out.update({f"{split}/{k}": v for k, v in scores.items()})
            f1s.append(scores["f1"])
            accs.append(scores["accuracy"])
        if self.mode == "lmms_eval" and f1s:
            out.update(self._scores(self.counts.sum(dim=0)))
        elif f1s:
            out["f1"] = torch.stack(f1s).mean()
            out["accuracy"] = torch.stack(accs).mean()
        return out


def _hub_records(rows, hub):
    """lmms-lab/POPE rows (`id`, `question_id`, `question`, `answer`, `image_source`, `image`,
    `category`): the sample id is `{category}/{question_id}`, as in the published per-split
    files (question ids restart in each split)."""
    for row in rows:
        yield {**row, "question_id": f"{row['category']}/{row['question_id']}"}


BENCHMARK = Benchmark(
    POPEMetrics,
    same_answer,
    "f1",
    local="LLaVA's llava_pope_test.jsonl or POPE's coco_pope_<split>.json + COCO val2014",
    hub=HubSource("lmms-lab/POPE", "test", records=_hub_records),
)
