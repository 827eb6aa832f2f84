"""GQA: reader and the official `eval.py` scores (accuracy, binary/open, per type, validity,
plausibility, consistency, distribution).

Official: GQA's `eval.py` as LLaVA runs it (`scripts/v1_5/eval/gqa.sh`: `eval.py --tier
testdev_balanced`, with the edit LLaVA's docs/Evaluation.md links to; the copy read is
SHI-Labs/VCoder@2f95684dddff603383b18d59dd7153481a98863e `playground/data/eval/gqa/data/eval/eval.py`,
its main loop, `belongs`, `updateConsistency` and `chiSquare`). A prediction is correct when it
equals the gold answer; only `isBalanced` questions are scored.
Default pipeline: `parse` applies LLaVA's `scripts/convert_gqa_for_eval.py` step
(haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd: `rstrip('.').lower()` of the
stripped generation), then `GQAAccuracy()` scores as `eval.py` does.
lmms-eval (EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3, `gqa.yaml`:
`exact_match` with `ignore_case` and `ignore_punctuation`, `lmms_eval/api/metrics.py:exact_match_hf_evaluate`):
`parse(..., mode="raw")` + `GQAAccuracy(mode="lmms_eval")`, which deletes every ASCII punctuation
character and ignores case on both sides ("t-shirt" == "tshirt", "yes," == "yes").

Keys: `accuracy`; `binary` and `open` (structural type "query" is open); `structural/<type>` and
`semantic/<type>` ("Accuracy / structural type", "/ semantic type"); where the data carries
them, `validity` and `plausibility` (the `{tier}_choices.json` file, read with `choices=`),
`consistency` (the `entailed` questions, when every one of them was answered: read the
`all_questions` file with `balanced_only=False`) and `distribution` (chi-square over `groups.global`,
lower is better). Parity: tests/fixtures/official/gqa/{official,lmms_eval}.json.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import SWP, GroupedMean, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark

PROMPT = "{question}" + SWP
STRUCTURAL = ("verify", "query", "choose", "logical", "compare")
SEMANTIC = ("attr", "cat", "global", "obj", "rel")
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def prompt(question: str) -> str:
    """The question followed by "Answer the question using a single word or phrase."."""
    return PROMPT.format(question=question)


def _choices(path: Path, choices: str | Path | None) -> dict:
    if choices is None:
        return {}
    file = Path(choices)
    if not file.is_absolute():
        file = path.parent / file
    if not file.is_file():
        raise FileNotFoundError(f"{path}: choices file {file} does not exist")
    return json.loads(file.read_text(encoding="utf-8"))


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    choices: str | Path | None = None,
    balanced_only: bool = True,
    check_media: bool = True,
) -> list[Sample]:
    """Read GQA questions (`question_id`, `question`, `imageId`, `answer`, `fullAnswer`, ...).

    Accepts GQA's own `{question_id: record}` object (`testdev_balanced_questions.json`) or a
    list/JSON-lines of records. The image is the record's `image` if given, else `{imageId}.jpg`
    under `root`. `types`, `groups`, `entailed` and `isBalanced` go to the sample's meta for the
    breakdowns; `choices` (e.g. `testdev_balanced_choices.json`, relative to the questions file's
    folder) adds each question's `valid` and `plausible` answers. `balanced_only=False` also
    asks the unbalanced questions (of an `all_questions` file): they are not scored, but
    consistency looks at them.
    """
    path = Path(path)
    valid = _choices(path, choices)
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("question_id", rec.get("_key", f"#{i}")))
        balanced = bool(rec.get("isBalanced", True))
        if balanced_only and not balanced:
            continue
        question = field(rec, "question", path, rid)
        rel = rec.get("image") or f"{field(rec, 'imageId', path, rid)}.jpg"
        image = resolve(rel, root, path, rid, check_media)
        types = rec.get("types") or {}
        meta = {
            "answer": field(rec, "answer", path, rid),
            "full_answer": rec.get("fullAnswer"),
            "question_id": rid,
            "balanced": balanced,
            "structural": types.get("structural"),
            "semantic": types.get("semantic"),
            "detailed": types.get("detailed"),
        }
        if "entailed" in rec:
            meta["entailed"] = [str(e) for e in rec["entailed"]]
        if "groups" in rec:
            meta["group"] = (rec["groups"] or {}).get("global")
        if rid in valid:
            meta["valid"] = valid[rid]["valid"]
            meta["plausible"] = valid[rid]["plausible"]
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


def belongs(element: str, group: Sequence[str], detailed: str | None) -> bool:
    """eval.py's `belongs`: "Common" questions accept any of color/material/shape."""
    if detailed is not None and "Common" in detailed:
        group = ["color", "material", "shape"]
    return element in group


def _key(text: str | None) -> int:
    """A 64-bit key of a string (ids and answers travel between ranks as tensors)."""
    if text is None:
        return -1
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _chi_square(gold: dict, predicted: dict) -> float:
    """eval.py's `chiSquare`: per global group, sum of (o - e)^2 / e over gold answers,
    weighted by the group's size."""
    total_score, total = 0.0, 0
    for group, answers in gold.items():
        score, overall = 0.0, 0
        for ans, e in answers.items():
            o = predicted[group].get(ans, 0)
            score += float(o - e) ** 2 / e
            overall += e
        total_score += score * overall
        total += overall
    return total_score / total


class GQAAccuracy(GroupedMean):
    """GQA's eval.py scores ×100: accuracy, binary/open, per type, and the data-dependent ones."""

    def __init__(self, mode: Literal["official", "lmms_eval"] = "official"):
        """
        Args:
            mode: "official" (exact equality) or "lmms_eval" (ignore case and punctuation).
        """
        groups = ["all", "binary", "open", "validity", "plausibility"]
        groups += [f"structural/{t}" for t in STRUCTURAL] + [f"semantic/{t}" for t in SEMANTIC]
        super().__init__(groups)
        self.mode = mode
        # per answered question: [key, correct, balanced, group, gold, predicted]
        self.add_state("rows", [], dist_reduce_fx="cat")
        self.add_state("edges", [], dist_reduce_fx="cat")  # [question key, entailed key]

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed predictions with their samples' `meta` (needs `answer`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            correct = gqa_correct(pred, meta["answer"], self.mode)
            balanced = meta.get("balanced", True)
            qid = meta.get("question_id")
            key = _key(qid)
            group = meta.get("group")
            row = [key, int(correct), int(balanced), _key(group), _key(meta["answer"]), _key(pred)]
            self.rows.append(torch.tensor([row], dtype=torch.long))
            if "entailed" in meta:
                inferred = [e for e in meta["entailed"] if e != qid]
                # a question without entailed ones still marks that the data carries them
                pairs = [[key, _key(e)] for e in inferred] or [[key, key]]
                self.edges.append(torch.tensor(pairs, dtype=torch.long))
            if not balanced:
                continue
            self._add("all", correct)
            structural = meta.get("structural")
            if structural is not None:
                self._add("open" if structural == "query" else "binary", correct)
                if f"structural/{structural}" in self._index:
                    self._add(f"structural/{structural}", correct)
            semantic = meta.get("semantic")
            if semantic is not None and f"semantic/{semantic}" in self._index:
                self._add(f"semantic/{semantic}", correct)
            if "valid" in meta:
                self._add("validity", belongs(pred, meta["valid"], meta.get("detailed")))
                self._add("plausibility", belongs(pred, meta["plausible"], meta.get("detailed")))

    def _cat(self, state) -> torch.Tensor | None:
        if isinstance(state, torch.Tensor):
            return state if state.numel() else None
        return torch.cat(state) if state else None

    def compute(self) -> dict:
        """`accuracy`, `binary`, `open`, `structural/*`, `semantic/*` and, where the data has
        them, `validity`, `plausibility`, `consistency` and `distribution`."""
        per_group = self._per_group()
        out = {"accuracy": per_group.pop("all", torch.tensor(0.0, dtype=torch.float64))}
        out.update(per_group)
        rows = self._cat(self.rows)
        if rows is None:
            return out
        consistency = self._consistency(rows, self._cat(self.edges))
        if consistency is not None:
            out["consistency"] = torch.tensor(consistency, dtype=torch.float64)
        balanced = rows[rows[:, 2] == 1]
        if (balanced[:, 3] != -1).any():
            gold: dict = defaultdict(lambda: defaultdict(int))
            predicted: dict = defaultdict(lambda: defaultdict(int))
            for _, _, _, group, g, p in balanced.tolist():
                if group != -1:
                    gold[group][g] += 1
                    predicted[group][p] += 1
            out["distribution"] = torch.tensor(_chi_square(gold, predicted) / 100)
        return out

    @staticmethod
    def _consistency(rows: torch.Tensor, edges: torch.Tensor | None) -> float | None:
        """eval.py's `updateConsistency` averaged (×100); None without entailment data or when
        an entailed question was not answered (eval.py needs every one)."""
        if edges is None:
            return None
        correct = {k: c for k, c, *_ in rows.tolist()}
        balanced = {k: b for k, _, b, *_ in rows.tolist()}
        inferred: dict[int, list[int]] = defaultdict(list)
        for q, e in edges.tolist():
            if q != e:
                inferred[q].append(e)
        scores = []
        for q, targets in inferred.items():
            if not (balanced.get(q) and correct.get(q)):
                continue
            if any(e not in correct for e in targets):
                return None
            scores.append(sum(correct[e] for e in targets) / len(targets))
        return 100 * sum(scores) / len(scores) if scores else 0.0


def _hub_records(rows, hub):
    """lmms-lab/GQA: the questions subset (`*_instructions`: `id`, `imageId`, `question`,
    `answer`, `fullAnswer`, `isBalanced`, `groups`, `entailed`, `types`, ...) joined by `imageId`
    with the images subset of the same name (`*_images`: `id`, `image`), as lmms-eval's
    `gqa_process_docs` does."""
    subset = hub.subset or ""
    if not subset.endswith("_instructions"):
        raise ValueError(
            f"GQA hub subset {subset!r}: expected a questions subset `<split>_instructions` "
            "(e.g. testdev_balanced_instructions), whose images are `<split>_images`"
        )
    image_subset = subset.replace("_instructions", "_images")
    images = {row["id"]: row["image"] for row in hub.load(image_subset)}
    for row in rows:
        question_id = str(row.pop("id"))
        image = images.get(row.get("imageId"))
        if image is None:
            raise BadRecordError(
                f"hf:{hub.ref}",
                question_id,
                f"image {row.get('imageId')!r} is not in {image_subset}",
            )
        yield {"question_id": question_id, **row, "image": image}


BENCHMARK = Benchmark(
    GQAAccuracy,
    lambda p, m, metric: float(gqa_correct(p, m["answer"], getattr(metric, "mode", "official"))),
    "accuracy",
    local="testdev_balanced_questions.json + GQA images",
    hub=HubSource(
        "lmms-lab/GQA", "testdev", subset="testdev_balanced_instructions", records=_hub_records
    ),
)
