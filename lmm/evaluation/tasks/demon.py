"""DEMON-Core (Cheetah): reader, prompt and the official scorers.

Official scorer: DCDmllm/Cheetah @ 619bd61894e61d4710f23d23443c72b23df77e58,
`DEMON Benchmark/scripts/evaluate.py` (`Eval.process`, `evaluate_rouge`, `evaluate_multichoice`
with `judge_multi_choice`, `evaluate_multi_choice_image`, dispatched by `question_type` and
`image_choice_dataset_list`) and `i4_score.py:dict_mean` (categories); prompts and image folder
as `Cheetah/i4_cheetah_llama2.py:IDataset` builds them.

Every text first goes through the VQA punctuation rule, quote stripping and lower-casing. Then:
- open-ended datasets: ROUGE-L F of the `rouge` package (v1.0.1, re-implemented: sentences split
  on ".", distinct-word counts, union LCS), 0 for an empty prediction;
- multi-choice datasets: the choice with the highest TF-IDF cosine to the prediction (sklearn
  `TfidfVectorizer` defaults, re-implemented) must equal the gold answer; with no usable token at
  all, exact equality. Empty or one-letter outputs give a zero vector, so the first choice wins;
- image-choice datasets: the first 7 characters must match and at most one "image x" may appear.
A dataset's score is the mean over its samples ×100; a category's, `dict_mean` of its datasets
(their mean rounded to 5 decimals, ×100). The official image-choice list misspells
`RecipeQA_VisualCloze`, which is therefore scored by TF-IDF ("Image A" … "Image D" share one
2-letter token, so the first choice always wins); `IMAGE_CHOICE_FIXED` is the list with the
spelling fixed. Parity: `tests/fixtures/official/demon/{official,image_choice_fixed}.json`."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lmm.data.sample import BadRecordError, Media, Part, Sample, Turn
from lmm.evaluation.tasks._base import GroupedMean, resolve
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks._normalize import process_punctuation

IMAGE_CHOICE_OFFICIAL = ("recipeqa-RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel")
IMAGE_CHOICE_FIXED = ("RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel")
# Cheetah replaces "{image#k}" and "{table#k}" (a table given as an image) by the k-th image.
_IMAGE_MARKER = re.compile(r"\{(?:image|table)#(\d+)\}")
_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern
_IMAGE_NAMES = ("image a", "image b", "image c", "image d")


def prompt(instruction: str, context: str, choices: Sequence[str] | None = None) -> str:
    """Cheetah's `IDataset.__getitem__` (`Cheetah/i4_cheetah_llama2.py`): instruction + context,
    then `Choice list:['a', 'b']. Your answer is:` when the item has a `choice_list`."""
    text = instruction + context
    if choices:
        text += "Choice list:['" + "', '".join(choices) + "']. Your answer is:"
    return text


def _parts(context: str, n_images: int, source, rid: str) -> list[Part]:
    numbers = [int(k) for k in _IMAGE_MARKER.findall(context)]
    if not numbers:
        return [p for i in range(n_images) for p in (Media(i), "\n")] + [context]
    base = 0 if 0 in numbers else 1  # "{image#1}" is the first image unless "{image#0}" exists
    parts: list[Part] = []
    for k, piece in enumerate(_IMAGE_MARKER.split(context)):
        if k % 2 == 0:
            if piece:
                parts.append(piece)
            continue
        index = int(piece) - base
        if not 0 <= index < n_images:
            raise BadRecordError(
                source, rid, f"{{image#{piece}}} but {n_images} images_path entries"
            )
        parts.append(Media(index))
    return parts


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    dataset: str | None = None,
    category: str | None = None,
    check_media: bool = True,
) -> list[Sample]:
    """Read one `{category}/{dataset}/core/core.json` (`metadata` + `data` of task instances).

    `dataset` and `category` default to the folder names; image paths are relative to `root`
    (default: `core/images/` beside core.json, as Cheetah's `i4_cheetah_llama2.py` reads them).
    Image-choice items (COMICS_Panel, RecipeQA_*) may carry no `choice_list`.
    """
    path = Path(path)
    dataset = dataset or path.parent.parent.name
    root = root if root is not None else path.parent / "images"
    category = category or path.parent.parent.parent.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        instructions = data["metadata"]["task_instruction"]
        qtype = data["metadata"]["question_type"]
        items = data["data"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise BadRecordError(path, "metadata", f"not a DEMON core.json ({err!r})") from err
    if qtype not in ("multi-choice", "open-ended"):
        raise BadRecordError(
            path, "metadata", f"question_type {qtype!r} is not multi-choice/open-ended"
        )
    samples = []
    for i, item in enumerate(items):
        rid = f"{dataset}/{item.get('sample_id', f'#{i}')}"  # sample ids restart per dataset
        try:
            instance = item["task_instance"]
            instruction = instructions[int(item.get("task_instruction_id", 0))]
            context = instance["context"]
            response = str(item["response"])
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise BadRecordError(path, rid, f"malformed task instance ({err!r})") from err
        choices = instance.get("choice_list") if qtype == "multi-choice" else None
        if choices:
            if process(response) not in [process(c) for c in choices]:
                raise BadRecordError(path, rid, f"response {response!r} is not in choice_list")
        if not process(response):
            raise BadRecordError(path, rid, "empty response")
        images = [resolve(p, root, path, rid, check_media) for p in instance.get("images_path", [])]
        parts = _parts(prompt(instruction, context, choices), len(images), path, rid)
        meta = {
            "answer": response,
            "choice_list": list(choices or []),
            "question_type": qtype,
            "dataset": dataset,
            "category": category,
        }
        samples.append(Sample(rid, [Turn("user", parts)], images, source=str(path), meta=meta))
    return samples


def dataset_categories(samples: Sequence[Sample]) -> dict[str, str]:
    """`{dataset: category}` of read samples, to build `DemonScore`."""
    return {s.meta["dataset"]: s.meta["category"] for s in samples}


def parse(output: str, sample_meta: Mapping | None = None) -> str:
    """The output unchanged: every DEMON scorer reads the whole answer."""
    return output


def process(text: str) -> str:
    """DEMON's `Eval.process`: VQA punctuation rule, strip quotes, lower-case."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_punctuation(text).strip("'").strip('"').strip().lower()


# ------------------------------------------------------------------------ ROUGE-L (rouge 1.0.1)


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one LCS of x and y, reconstructed with the package's tie-breaking."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F as `Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]` of the `rouge` package."""
    hyp = [" ".join(s.split()) for s in hypothesis.split(".") if len(s) > 0]
    ref = [" ".join(s.split()) for s in reference.split(".") if len(s) > 0]
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    ref_words = [s.split(" ") for s in ref]
    # Counts are of *distinct* words (the package's default `exclusive=True`).
    m = len({w for s in ref_words for w in s})
    n = len({w for s in hyp_words for w in s})
    union: set[str] = set()
    for r in ref_words:
        for h in hyp_words:
            union |= _lcs_words(r, h)
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


# --------------------------------------------------------------------------- TF-IDF (sklearn)


def tfidf_best(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the choice with the highest TF-IDF cosine to the prediction (first on ties).

    None when no text has a token (sklearn raises "empty vocabulary" there).
    """
    docs = [Counter(_TOKEN.findall(t.lower())) for t in [prediction, *choices]]
    vocab = sorted(set().union(*docs))
    if not vocab:
        return None
    n = len(docs)
    df = {w: sum(w in d for d in docs) for w in vocab}
    idf = {w: math.log((1 + n) / (1 + df[w])) + 1 for w in vocab}  # smooth_idf=True

    def unit(d: Counter) -> dict[str, float]:
        vec = {w: c * idf[w] for w, c in d.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {w: v / norm for w, v in vec.items()} if norm else {}

    pred = unit(docs[0])
    sims = [sum(v * pred.get(w, 0.0) for w, v in unit(d).items()) for d in docs[1:]]
    return sims.index(max(sims))


def demon_score(
    prediction: str, sample_meta: Mapping, image_choice: Sequence[str] = IMAGE_CHOICE_OFFICIAL
) -> float:
    """One sample's official score in [0, 1]."""
    gold, pred = process(sample_meta["answer"]), process(prediction)
    if sample_meta["question_type"] == "open-ended":
        return 0.0 if pred == "" else rouge_l(pred, gold)
    if sample_meta["dataset"] in image_choice:
        if sum(name in pred for name in _IMAGE_NAMES) > 1:
            return 0.0
        return float(gold[:7] == pred[:7])
    if not sample_meta["choice_list"]:
        raise ValueError(
            f"DEMON dataset {sample_meta['dataset']!r} is scored by TF-IDF over the choice_list, "
            "but its item has none (the official script fails there too); if it is an "
            "image-choice dataset, list it in `image_choice` (e.g. IMAGE_CHOICE_FIXED)"
        )
    choices = [process(c) for c in sample_meta["choice_list"]]
    best = tfidf_best(pred, choices)
    return float((pred if best is None else choices[best]) == gold)


class DemonScore(GroupedMean):
    """DEMON score ×100 per dataset, per category (mean of its datasets) and averaged over categories."""

    def __init__(
        self, datasets: Mapping[str, str], image_choice: Sequence[str] = IMAGE_CHOICE_OFFICIAL
    ):
        """
        Args:
            datasets: `{dataset: category}` for every dataset scored (see `dataset_categories`).
            image_choice: datasets scored by the "image x" rule; the official list by default
                (misspelled, so RecipeQA_VisualCloze falls to TF-IDF), or `IMAGE_CHOICE_FIXED`.
        """
        super().__init__(list(datasets))
        self.categories = dict(datasets)
        self.image_choice = tuple(image_choice)

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add raw outputs with their samples' `meta` (needs `answer`, `question_type`, `dataset`, ...)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add(meta["dataset"], demon_score(pred, meta, self.image_choice))

    def compute(self) -> dict:
        """`dataset/{name}`, `category/{name}` and `average` (mean over categories).

        A category is `i4_score.py:dict_mean` of its datasets' fractions: their mean rounded to 5
        decimals, ×100 (so 12.346000000000002 as the script prints it).
        """
        out: dict[str, torch.Tensor] = {f"dataset/{k}": v for k, v in self._per_group().items()}
        fractions = (self.sums / self.counts.clamp(min=1)).tolist()
        by_category: dict[str, list[float]] = {}
        for i, name in enumerate(self.groups):
            if self.counts[i] > 0:
                by_category.setdefault(self.categories[name], []).append(fractions[i])
        for cat, values in by_category.items():
            score = round(sum(values) / len(values), 5) * 100
            out[f"category/{cat}"] = torch.tensor(score, dtype=torch.float64)
        if by_category:
            out["average"] = torch.stack([out[f"category/{c}"] for c in by_category]).mean()
        return out


BENCHMARK = Benchmark(
    DemonScore,
    lambda p, m, metric: demon_score(p, m, getattr(metric, "image_choice", IMAGE_CHOICE_OFFICIAL)),
    "average",
    metric_args=lambda samples: {"datasets": dataset_categories(samples)},
    local="DEMON-Core {category}/{dataset}/core/core.json + core/images/",
    hub=None,  # no hub copy that lmms-eval reads
)
