"""MMBench: readers (VLMEvalKit's TSV, JSON records), VLMEvalKit's exact matching and CircularEval.

Source: open-compass/VLMEvalKit @ e8e78f05f3080fe28154f2130321f17951c3be94,
`vlmeval/utils/matching_util.py` (`can_infer`, `can_infer_option`, `can_infer_text`) and
`vlmeval/dataset/utils/multiple_choice.py` (`prefetch_circular_group`, `mcq_circular_eval`,
`report_acc`), run by `ImageMCQDataset.evaluate_heuristic` with `model="exact_matching"` (no GPT
judge; `VERBOSE` unset). `tests/fixtures/official/mmbench/official.json` holds what that code
made of our cases.

Circular copies of question g have index g + k·1e6 with the options rotated (the official TSVs
ship them; `circular=True` builds them from a file of originals). A group scores only if every
copy parses to its answer; a group counts when its original (index == g) was scored. Unparsed
answers ("" here; VLMEvalKit's `False`) and refusals ("Z") are wrong.
"""

from __future__ import annotations

import base64
import csv
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource, media_suffix
from lmm.evaluation.tasks._base import LETTER, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer
from lmm.evaluation.tasks._choices import UPPER, dotted_options

GROUP_STRIDE = 1_000_000
PromptStyle = Literal["llava", "lmms_eval", "vlmevalkit"]

# What `pandas.read_csv` reads as a missing cell by default (VLMEvalKit loads its TSVs with it).
_PANDAS_NA = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)  # fmt: skip


def _missing(value) -> bool:
    # JSON copies (lmms-lab's hub export) write a missing option as "nan"; pandas gives NaN.
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def prompt(
    question: str, options: Sequence[str], hint: str = "", style: PromptStyle = "llava"
) -> str:
    """The question with its options in LLaVA's (default), lmms-eval's or VLMEvalKit's layout.

    `vlmevalkit` is `ImageMCQDataset.build_prompt` (same commit as the scorer), trailing " \\n"
    included.
    """
    opts = dotted_options(options)
    if style == "llava":
        head = f"{hint}\n{question}" if hint else question
        return f"{head}\n{opts}{LETTER}"
    if style == "lmms_eval":
        head = f"{hint} {question}" if hint else question
        return f"{head} There are several options:\n{opts}{LETTER}"
    if style == "vlmevalkit":
        head = f"Hint: {hint}\n" if hint else ""
        return (
            f"{head}Question: {question}\nOptions:\n{opts}\n"
            "Please select the correct answer from the options above. \n"
        )
    raise ValueError(f"unknown MMBench prompt style {style!r}")


# ------------------------------------------------------------------------------------ reading


def _tsv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """VLMEvalKit's TSV (pandas `to_csv(sep="\\t")`): cells pandas reads as NaN become None."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # base64 images are long cells
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            return
        for i, cells in enumerate(reader):
            if len(cells) != len(header):
                raise BadRecordError(
                    path, f"line {i + 2}", f"{len(cells)} cells but {len(header)} columns"
                )
            yield (
                i,
                {k: (None if v in _PANDAS_NA else v) for k, v in zip(header, cells, strict=True)},
            )


class _TsvImages:
    """The TSV's `image` cells: base64 (decoded to `folder`) or the index of the row holding it.

    As VLMEvalKit's `ImageBaseDataset`: a cell of at most 64 characters names another row.
    Each image is written once, as `<index>.<ext>` (or the row's `image_path`), and only when
    `write` (a reading with `check_media`).
    """

    def __init__(self, rows: list[dict], folder: Path, source: Path, write: bool):
        self.cells = {str(r.get("index")): r.get("image") for r in rows}
        self.folder, self.source, self.write = folder, source, write
        self.done: dict[str, Path] = {}

    def path(self, rec: Mapping, rid: str) -> Path:
        key = rid
        cell = self.cells[key]
        if cell is not None and len(cell) <= 64:
            key = cell
            cell = self.cells.get(key)
            if cell is None or len(cell) <= 64:
                raise BadRecordError(
                    self.source, rid, f"image refers to row {key!r}, which holds no image"
                )
        if key not in self.done:
            try:
                data = base64.b64decode(cell, validate=False)
            except ValueError as err:
                raise BadRecordError(self.source, rid, f"image is not base64: {err}") from err
            name = rec.get("image_path") if key == rid else None
            target = self.folder / (name or f"{key}{media_suffix(data[:16])}")
            if self.write and not (target.is_file() and target.stat().st_size == len(data)):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.done[key] = target
        return self.done[key]


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    circular: bool = False,
    style: PromptStyle = "llava",
    check_media: bool = True,
) -> list[Sample]:
    """Read MMBench: VLMEvalKit's `.tsv` or JSON / JSON-lines records.

    Fields: `index`, `question`, `hint`, `A`..., `answer`, `category`, `l2-category` (lmms-lab's
    hub copy: `L2-category`), optional `g_index`, and the image:
    - `.tsv` (VLMEvalKit's `MMBench_DEV_EN.tsv`, ...): `image` holds the base64 image, or the index
      of the row that holds it (circular copies); images are decoded to `root` (default: a
      `<file stem>_images` folder beside the file) when `check_media`. As VLMEvalKit
      (`skip_noimg`), rows whose `image` cell is empty are skipped; a TSV with no `image` column
      reads `image_path` (relative to `root`), or gives text-only samples.
    - JSON: `image` (or `image_path`) is a path relative to `root`; a record without one is a
      text-only sample.

    `circular=True` builds the rotated copies (index g + k·1e6) of a file that holds originals only.
    """
    path = Path(path)
    tsv = path.suffix.lower() == ".tsv"
    rows = list(_tsv_rows(path) if tsv else records(path))
    images = None
    if tsv and any("image" in r for _, r in rows):
        folder = Path(root) if root is not None else path.parent / f"{path.stem}_images"
        images = _TsvImages([r for _, r in rows], folder, path, check_media)
    samples = []
    for i, rec in rows:
        rid = str(rec.get("index", f"#{i}"))
        if images is not None and rec.get("image") is None:
            continue  # VLMEvalKit drops rows without an image (ImageBaseDataset, skip_noimg)
        index = _integer(field(rec, "index", path, rid, object), path, rid)
        present = [c for c in UPPER if c in rec and not _missing(rec[c])]
        if len(present) < 2:
            raise BadRecordError(path, rid, f"{len(present)} options, expected at least 2")
        answer = str(field(rec, "answer", path, rid, object)).strip()
        if answer not in present:
            raise BadRecordError(path, rid, f"answer {answer!r} is not one of the options")
        hint = "" if _missing(rec.get("hint")) else str(rec["hint"])
        question = str(field(rec, "question", path, rid, object))
        group = _integer(rec["g_index"], path, rid) if rec.get("g_index") is not None else None
        if images is not None:
            media = [images.path(rec, rid)]
        elif rec.get("image") or rec.get("image_path"):
            rel = rec.get("image") or rec["image_path"]
            media = [resolve(str(rel), root, path, rid, check_media)]
        else:
            media = []
        if circular and index >= GROUP_STRIDE:
            raise BadRecordError(path, rid, "already a circular copy", "read with circular=False")
        options = [str(rec[c]) for c in present]
        category = None if _missing(rec.get("category")) else str(rec["category"])
        l2 = rec.get("l2-category", rec.get("L2-category"))
        l2 = None if _missing(l2) else str(l2)
        for k in range(len(options)) if circular else [0]:
            if circular:
                rotated = options[k:] + options[:k]
                choices = dict(zip(UPPER, rotated, strict=False))
                letter = UPPER[(present.index(answer) - k) % len(options)]
            else:  # the row's own letters, as VLMEvalKit's `build_choices`
                choices = dict(zip(present, options, strict=True))
                letter = answer
            meta = {
                "index": index + k * GROUP_STRIDE,
                "group": group if group is not None else (index % GROUP_STRIDE),
                "answer": letter,
                "choices": choices,
                "category": category,
                "l2_category": l2,
            }
            text = prompt(question, list(choices.values()), hint, style)
            samples.append(image_first(str(meta["index"]), text, media, path, meta))
    return samples


def _integer(value, source: Path, rid: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():
        raise BadRecordError(source, rid, f"index {value!r} is not an integer")
    return int(number)


# ------------------------------------------------------------------------------------ parsing

_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer_option` (`VERBOSE` unset): the option letter, "Z" or None.

    One option letter among the tokens (after `.()[],:;!*#{}` become spaces), standing among the
    last four tokens; else "Z" when no letter but a "Z" token; else `answer is X` (X in A-D, any
    case, "correct" optional).
    """
    if "Failed to obtain answer via API" in answer:
        return None
    if any(err in answer for err in _REFUSALS):
        return "Z"
    mod = answer
    for ch in ".()[],:;!*#{}":
        mod = mod.replace(ch, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(c in splits for c in choices)
    if count == 1:
        for c in choices:
            if c in splits and splits.index(c) > len(splits) - 5:
                return c
    elif count == 0 and "Z" in splits:
        return "Z"
    match = _VERBOSE_ANSWER.search(answer)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer_text`: the one option whose text is in the answer (case-insensitive);
    None when several or none are, or when the answer is longer than twice all options' text."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer`: the option stage, else the option-text stage."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def parse(output: str, sample_meta: Mapping) -> str:
    """VLMEvalKit `can_infer` on the sample's options: a letter, "Z" (refusal) or "" (unparsed)."""
    return can_infer(output, sample_meta["choices"]) or ""


# ------------------------------------------------------------------------------------ metric


class MMBenchCircular(Metric):
    """MMBench CircularEval accuracy ×100, per category and L2 category, and plain accuracy.

    As VLMEvalKit's `report_acc`, a group's category is its original copy's; VLMEvalKit prints
    the L2 categories under abbreviations (coarse_perception: CP, ...), here they keep their names.
    """

    full_state_update = False

    def __init__(self, categories: Sequence[str] = (), l2_categories: Sequence[str] = ()):
        """
        Args:
            categories: every `category` a sample may carry (the default task lists the file's).
            l2_categories: every L2 category (`l2-category`) a sample may carry.
        """
        super().__init__()
        self.categories = list(categories)
        self.l2_categories = list(l2_categories)
        # One row per copy: (group, is original copy, correct, category id, L2 id); -1: none.
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def _id(self, names: list[str], name, key: str) -> int:
        if name is None:
            return -1
        if name not in names:
            raise ValueError(
                f"MMBenchCircular: unknown {key} {name!r}; known: {names}. "
                f"Pass every {key} to the constructor"
            )
        return names.index(name)

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed letters with their samples' `meta` (needs `answer`, `group`, `index`)."""
        rows = [
            [
                int(m["group"]),
                int(int(m["index"]) == int(m["group"])),
                int(p == m["answer"]),
                self._id(self.categories, m.get("category"), "category"),
                self._id(self.l2_categories, m.get("l2_category"), "l2_category"),
            ]
            for p, m in zip(predictions, metas, strict=True)
        ]
        if rows:
            self.rows.append(torch.tensor(rows, dtype=torch.long))

    def compute(self) -> dict:
        """`circular` (groups with every copy right / groups), `category/<c>` and
        `l2_category/<l>` (the same per group category), `vanilla` (originals right / originals)."""
        rows = dim_zero_cat(self.rows) if self.rows else torch.zeros(0, 5, dtype=torch.long)
        originals = rows[rows[:, 1] == 1]
        if len(originals) == 0:
            zero = torch.tensor(0.0, dtype=torch.float64)
            return {"circular": zero, "vanilla": zero}
        groups, inverse = torch.unique(rows[:, 0], return_inverse=True)
        wrong = torch.zeros(len(groups), dtype=torch.long).index_add_(0, inverse, 1 - rows[:, 2])
        # One hit per original copy (VLMEvalKit iterates the originals, `data_main`).
        hit = (wrong[torch.searchsorted(groups, originals[:, 0].contiguous())] == 0).double()
        out = {"circular": 100 * hit.mean(), "vanilla": 100 * originals[:, 2].double().mean()}
        for key, column, names in (
            ("category", 3, self.categories),
            ("l2_category", 4, self.l2_categories),
        ):
            for i, name in enumerate(names):
                mask = originals[:, column] == i
                if mask.any():
                    out[f"{key}/{name}"] = 100 * hit[mask].mean()
        return out


def _metric_args(samples: list[Sample]) -> dict:
    """The categories of the samples read, for `MMBenchCircular`."""
    cats = sorted({s.meta["category"] for s in samples if s.meta.get("category") is not None})
    l2 = sorted({s.meta["l2_category"] for s in samples if s.meta.get("l2_category") is not None})
    return {"categories": cats, "l2_categories": l2}


BENCHMARK = Benchmark(
    MMBenchCircular,
    same_answer,
    "circular",
    metric_args=_metric_args,
    local="VLMEvalKit's MMBench_DEV_EN.tsv, or its rows as JSON lines + images",
    # the hub copy holds the circular copies already (read it with circular: false)
    hub=HubSource("lmms-lab/MMBench", "dev", subset="en"),
)
