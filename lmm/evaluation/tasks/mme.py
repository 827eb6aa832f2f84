"""MME: reader, the official yes/no/other rule and acc + acc+ per subtask.

Official: BradyFU/Awesome-Multimodal-Large-Language-Models @ dd2950902889cd614d4edf606827240166d29381
(branch Evaluation), `tools/eval_tool.zip` → `eval_tool/calculation.py`,
`calculate_metrics.parse_pred_ans` / `compute_metric` / `process_result`. Parse: lower-case (no
strip), exact "yes"/"no", else "yes" in the first 4 characters, else "no" there, else "other"
(scored wrong). So "   yes" and "y" are "other". (The tool reads `img\tq\tgt\tresponse` lines,
so a response holds no newline or tab; the line's own "\n" changes no parse.)
Score per subtask = 100·acc + 100·acc+ (acc+ = share of images whose two questions are right);
perception = sum of the 10 perception subtasks (max 2000), cognition of the 4 others (max 800).
The tool crashes (sklearn, empty input) on a subtask whose every answer is "other"; lmm scores it.

`mode="lmms_eval"`: EvolvingLMMs-Lab/lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
`lmms_eval/tasks/mme/utils.py:parse_pred_ans` (Otter's parser: also strips, deletes "." and maps
a lone "y"/"n"), scored by `mme_process_results` / `mme_aggregate_results` (the same acc + acc+
per subtask, per image = per `question_id`). `tests/fixtures/official/mme/` holds both codes'
results on our cases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import SWP, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_ORIGINAL_SUFFIX = " Please answer yes or no."


def prompt(question: str) -> str:
    """LLaVA/lmms-eval: the trailing " Please answer yes or no." becomes the single-word instruction."""
    if question.endswith(_ORIGINAL_SUFFIX):
        question = question[: -len(_ORIGINAL_SUFFIX)]
    return question + SWP


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read MME (`question_id` = "category/image", `image`, `question`|`text`, `answer`, `category`).

    Questions about the same (category, image) share `meta["pair_id"]`, which acc+ groups by. A
    `question_id` that repeats (LLaVA's `llava_mme.jsonl`, lmms-lab's copy: the image path for
    both questions) becomes the sample ids `<question_id>#0`, `<question_id>#1`, ... in file order,
    and names the image the pair is about (lmms-lab's rows embed the image, so its file is not a
    name: two distinct pictures with the same bytes stay two pairs).
    """
    rows = list(records(path))
    # LLaVA's and lmms-lab's files give both questions of an image its path as `question_id`.
    repeats = Counter(str(rec.get("question_id", f"#{i}")) for i, rec in rows)
    seen: Counter[str] = Counter()
    pairs: dict[tuple[str, str], int] = {}
    samples = []
    for i, rec in rows:
        qid = str(rec.get("question_id", f"#{i}"))
        rid = f"{qid}#{seen[qid]}" if repeats[qid] > 1 else qid
        seen[qid] += 1
        question = field(rec, ("question", "text"), path, rid)
        answer = field(rec, "answer", path, rid).strip().lower()
        if answer not in ("yes", "no"):
            raise BadRecordError(path, rid, f"answer {answer!r} is not Yes/No")
        category = rec.get("category") or rid.split("/")[0]
        if category not in PERCEPTION + COGNITION:
            raise BadRecordError(path, rid, f"unknown MME subtask {category!r}")
        rel = field(rec, "image", path, rid)
        pair_id = pairs.setdefault((category, qid if repeats[qid] > 1 else rel), len(pairs))
        image = resolve(rel, root, path, rid, check_media)
        meta = {"answer": answer, "category": category, "pair_id": pair_id}
        samples.append(image_first(rid, prompt(question), [image], path, meta))
    return samples


def parse(output: str, sample_meta: Mapping | None = None, mode: str = "official") -> str:
    """ "yes", "no" or "other" by the official rule (or lmms-eval's Otter rule)."""
    if mode == "official":
        pred = output.lower()
    elif mode == "lmms_eval":
        pred = output.lower().strip().replace(".", "")
        if len(pred) == 1:
            return {"y": "yes", "n": "no"}.get(pred, "other")
    else:
        raise ValueError(f"unknown MME parse mode {mode!r}; use 'official' or 'lmms_eval'")
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


class MMEScore(Metric):
    """MME acc, acc+ and score per subtask; perception and cognition totals."""

    full_state_update = False

    def __init__(self, subtasks: Sequence[str] = PERCEPTION + COGNITION):
        """
        Args:
            subtasks: the subtask names a sample's `category` may take (default: all 14).
        """
        super().__init__()
        self.subtasks = list(subtasks)
        self._index = {s: i for i, s in enumerate(self.subtasks)}
        # One row per question: (subtask index, pair id, correct); pair ids come from the file.
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed answers with their samples' `meta` (needs `answer`, `category`, `pair_id`)."""
        rows = []
        for pred, meta in zip(predictions, metas, strict=True):
            if meta["category"] not in self._index:
                raise ValueError(f"MME subtask {meta['category']!r} not in {self.subtasks}")
            rows.append(
                [self._index[meta["category"]], int(meta["pair_id"]), int(pred == meta["answer"])]
            )
        if rows:
            self.rows.append(torch.tensor(rows, dtype=torch.long))

    def compute(self) -> dict:
        """`{subtask}/{acc,acc_plus,score}`, `perception`, `cognition` (sums of subtask scores)."""
        rows = dim_zero_cat(self.rows) if self.rows else torch.zeros(0, 3, dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        totals = {"perception": 0.0, "cognition": 0.0}
        for i, name in enumerate(self.subtasks):
            sub = rows[rows[:, 0] == i]
            if len(sub) == 0:
                continue
            acc = sub[:, 2].double().mean()
            pair_ids, inverse = torch.unique(sub[:, 1], return_inverse=True)
            # An image counts for acc+ only if every one of its questions is right.
            wrong = torch.zeros(len(pair_ids), dtype=torch.long).index_add_(
                0, inverse, 1 - sub[:, 2]
            )
            acc_plus = (wrong == 0).double().mean()
            score = 100 * acc + 100 * acc_plus
            out.update({f"{name}/acc": 100 * acc, f"{name}/acc_plus": 100 * acc_plus})
            out[f"{name}/score"] = score
            totals["perception" if name in PERCEPTION else "cognition"] += float(score)
        out.update({k: torch.tensor(v, dtype=torch.float64) for k, v in totals.items()})
        return out


BENCHMARK = Benchmark(
    MMEScore,
    same_answer,
    "perception",
    scale=2000.0,
    local="mme.jsonl (LLaVA's llava_mme.jsonl with answers) + MME_Benchmark_release_version",
    hub=HubSource("lmms-lab/MME", "test"),
)
