"""MMMU (val): reader, the official parsers and instance-level accuracy with the official breakdowns.

Official: MMMU-Benchmark/MMMU @ bb0b95a945998d91dfef37e969e07d49d1139438, `mmmu/utils/eval_utils.py`:
`parse_multi_choice_response`, `parse_open_response`, `eval_multi_choice`, `eval_open`,
`calculate_ins_level_acc`; breakdown as `mmmu/main_eval_only.py` prints it (per subject, and
"Overall-<domain>" over `mmmu/utils/data_utils.py:DOMAIN_CAT2SUB_CAT`).

Multiple choice: strip `,.!?;:'` from the ends, then `(X)`, then ` X `, then option text (only if
the response has more than 5 words), else `random.choice`; with several candidates the last
occurrence wins. "D. fish" therefore goes to the random fallback (lmms-eval's extra `X.` stage
would read D; lmms-eval's rule is not offered).
The random fallback: `eval_utils.py` calls `random.seed(42)` at import and draws from the global
generator in the order the outputs are parsed. lmm gives every read of a benchmark file its own
generator seeded with `seed` (42) and draws from it in the order `parse` is called, so a run that
parses a file's outputs in file order (one process) draws what the official script draws; the
parity fixture relies on it. With several ranks each rank draws from its own generator.
Open questions: key sub-responses after "is/so/thus/answer/..." (and "=" in the last line),
numbers rounded to 2 dp, lower-cased strings; a string gold is right if it is a substring of a
candidate, a number if it equals one.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import (
    LETTER,
    SWP,
    GroupedMean,
    field,
    image_first,
    records,
    resolve,
)
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks._choices import dotted_options, letters, mmmu_choice, paren_options

SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
    "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science",
    "Design", "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics",
    "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage", "Marketing",
    "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)  # fmt: skip
MAX_IMAGES = 7
# mmmu/utils/data_utils.py:DOMAIN_CAT2SUB_CAT
DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy", "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
        "Energy_and_Power", "Materials", "Mechanical_Engineering",
    ),
}  # fmt: skip
SEED = 42  # eval_utils.py: random.seed(42) at import

# The random-fallback generators: one per (read of a benchmark file, seed), made on first draw.
_STREAMS: dict[tuple[str, int], random.Random] = {}
_READS = itertools.count()


def new_stream(path: str | Path) -> str:
    """A fresh key for the random fallbacks of one read of `path` (kept in `meta["stream"]`)."""
    return f"{path}#{next(_READS)}"


def stream(key: str | None, seed: int) -> random.Random | None:
    """The generator seeded with `seed` for the file read under `key` (None without a key)."""
    if key is None:
        return None
    rng = _STREAMS.get((key, seed))
    if rng is None:
        rng = _STREAMS[(key, seed)] = random.Random(seed)
    return rng


def prompt(
    question: str, options: Sequence[str], style: Literal["official", "lmms_eval"] = "official"
) -> str:
    """MC: official `q\\n\\n(A) x\\n(B) y\\n\\n\\n` + instruction, or lmms-eval's `A. x`; open: q + SWP."""
    if not options:
        return f"{question}\n{SWP}"
    if style == "official":
        return f"{question}\n\n{paren_options(options)}\n\n{LETTER}"
    if style == "lmms_eval":
        return f"{question}\n{dotted_options(options)}\n{LETTER}"
    raise ValueError(f"unknown MMMU prompt style {style!r}")


def subject_of(sample_id: str) -> str:
    """`validation_Art_Theory_12` -> `Art_Theory`."""
    return "_".join(sample_id.split("_")[1:-1])


def _literal_list(value, source, rid: str, name: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise BadRecordError(source, rid, f"{name} {value!r} is not a list literal") from err
        if isinstance(parsed, list):
            return parsed
    raise BadRecordError(source, rid, f"{name} {value!r} is not a list")


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    style: Literal["official", "lmms_eval"] = "official",
    check_media: bool = True,
) -> list[Sample]:
    """Read MMMU (`id`, `question`, `options`, `answer`, `question_type`, `image_1..7`, `subfield`).

    `options` may be a list or its string repr (lmms-eval); all present images go first, and the
    `<image k>` tags stay in the text as in the official prompt.
    """
    samples = []
    key = new_stream(path)
    for i, rec in records(path):
        rid = str(field(rec, "id", path, f"#{i}"))
        qtype = field(rec, "question_type", path, rid)
        options = _literal_list(rec.get("options", []), path, rid, "options")
        answer = field(rec, "answer", path, rid, object)
        if isinstance(answer, str) and answer.strip().startswith("["):
            answer = _literal_list(answer, path, rid, "answer")
        meta: dict = {
            "answer": answer,
            "question_type": qtype,
            "subject": subject_of(rid),
            "stream": key,
        }
        if qtype == "multiple-choice":
            choices = letters(len(options))
            if not options or (isinstance(answer, str) and answer not in choices):
                raise BadRecordError(
                    path, rid, f"answer {answer!r} not among {len(options)} options"
                )
            meta["all_choices"] = choices
            meta["index2ans"] = dict(zip(choices, map(str, options), strict=True))
        elif qtype == "open":
            options = []
        else:
            raise BadRecordError(path, rid, f"question_type {qtype!r} is not multiple-choice/open")
        rels = [rec[f"image_{k}"] for k in range(1, MAX_IMAGES + 1) if rec.get(f"image_{k}")]
        images = [resolve(r, root, path, rid, check_media) for r in rels]
        text = prompt(field(rec, "question", path, rid), options, style)
        samples.append(image_first(rid, text, images, path, meta))
    return samples


# ------------------------------------------------------------------------ open-question parse


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[str | float]:
    """Official `normalize_str`: a number rounded to 2 dp, else the lower-cased text."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    # One character: padded both ways so that "a" does not match inside every word.
    return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBER_PATTERNS = (
    r"-?\b\d{1,3}(?:,\d{3})+\b",  # with thousands separators
    r"-?\d+(?:\.\d+)?[eE][+-]?\d+",  # scientific
    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",  # plain
)
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = (":", ",", ".", "!", "?", ";", "'")


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # Split on ". X" or newlines; the text is already lower-case, so only newlines split
    # (the official code has the same order of operations).
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, resp in enumerate(subs):
        indicators = _INDICATORS + (("=",) if index == len(subs) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in resp:
                tail = resp.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list[str | float]:
    """Official `parse_open_response`: the normalised candidate answers (deduplicated)."""
    keys = _key_subresponses(response)
    candidates: list[str] = list(keys)
    for resp in keys:
        for pattern in _NUMBER_PATTERNS:
            candidates.extend(re.findall(pattern, resp))
    out: list[str | float] = []
    for c in candidates:
        for norm in normalize_str(c):
            if norm not in out:
                out.append(norm)
    return out


def eval_open(gold: str | list[str], candidates: Sequence[str | float]) -> bool:
    """Official `eval_open`: a string gold inside a string candidate, or an equal number."""
    golds = gold if isinstance(gold, list) else [gold]
    norm_golds: list[str | float] = [n for g in golds for n in normalize_str(str(g))]
    for cand in candidates:
        if isinstance(cand, str):
            if any(isinstance(g, str) and g in cand for g in norm_golds):
                return True
        elif cand in norm_golds:
            return True
    return False


def parse(
    output: str, sample_meta: Mapping, rng: random.Random | None = None, seed: int = SEED
) -> str | list[str | float]:
    """MC: the letter (random fallback from `rng`, else the file's generator seeded with `seed`);
    open: the list of normalised candidates (the official returns them as `list(set(...))`)."""
    if sample_meta["question_type"] == "multiple-choice":
        rng = rng or stream(sample_meta.get("stream"), seed)
        return mmmu_choice(output, sample_meta["all_choices"], sample_meta["index2ans"], rng)
    return parse_open(output)


def is_correct(parsed: str | list[str | float], sample_meta: Mapping) -> bool:
    """Official `eval_multi_choice` / `eval_open` on a parsed prediction."""
    gold = sample_meta["answer"]
    if sample_meta["question_type"] == "multiple-choice":
        return parsed in gold if isinstance(gold, list) else parsed == gold
    if isinstance(parsed, str):
        parsed = parse_open(parsed)
    return eval_open(gold, parsed)


class MMMUAccuracy(GroupedMean):
    """MMMU accuracy ×100: instance-level overall (`calculate_ins_level_acc`), per subject and
    per domain (`Overall-<domain>`, as `main_eval_only.py` prints them)."""

    def __init__(self, subjects: Sequence[str] = SUBJECTS):
        """
        Args:
            subjects: the subject names (from ids `validation_<Subject>_<n>`) to report.
        """
        super().__init__(subjects)

    def update(self, predictions: Sequence, metas: Sequence[Mapping]) -> None:
        """Add `parse` outputs with their samples' `meta` (needs `answer`, `question_type`, `subject`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add(meta["subject"], is_correct(pred, meta))

    def compute(self) -> dict:
        """`accuracy` (instance-weighted), one entry per subject seen and `Overall-<domain>` for
        each domain with samples."""
        out = {"accuracy": self._overall(), **self._per_group()}
        for domain, subjects in DOMAINS.items():
            idx = [self._index[s] for s in subjects if s in self._index]
            count = self.counts[idx].sum()
            if count > 0:
                out[f"Overall-{domain}"] = 100 * self.sums[idx].sum() / count
        return out


BENCHMARK = Benchmark(
    MMMUAccuracy,
    lambda p, m, metric: float(is_correct(p, m)),
    "accuracy",
    local="the validation split as JSON lines + images",
    hub=HubSource("lmms-lab/MMMU", "validation"),
)
