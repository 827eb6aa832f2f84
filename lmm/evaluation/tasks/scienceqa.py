"""ScienceQA-IMG: reader, LLaVA's letter rule (`eval_science_qa.py`) and IMG accuracy.

Default `parse(mode="llava")` accepts exactly a letter; `"X. "` + text (length >= 3); or exactly
one regex match of `The answer is ([A-Z]).` (its `.` is any character, so "The answer is B!"
counts and "The answer is B" does not). A letter beyond the number of choices is wrong.
`mode="lmms_eval"`: a letter in any case, or an upper-case letter followed by "." ("B.", "A.dog").
Neither accepts "(B)", "B)" or "Answer: B".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.tasks._base import LETTER, LetterAccuracy, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer
from lmm.evaluation.tasks._choices import dotted_options, letters

# LLaVA's `args.options`: the letters its parser knows at all.
LLAVA_OPTIONS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def prompt(question: str, choices: Sequence[str], hint: str = "") -> str:
    """`Context: {hint}\\n{question}\\nA. ...` + the letter instruction (empty hint: "N/A")."""
    # ScienceQA's base prompt (reused by LLaVA's converter) writes an empty context as "N/A".
    return f"Context: {hint or 'N/A'}\n{question}\n{dotted_options(choices)}{LETTER}"


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    images_only: bool = True,
    split: str | None = None,
    check_media: bool = True,
) -> list[Sample]:
    """Read ScienceQA problems (`pid`, `question`, `hint`, `choices`, `answer`, `image`, `subject`).

    `images_only` keeps the IMG subset (records with an image); `split` keeps one split when the
    records carry a `split` field. Accepts a list/JSON-lines or the `{pid: record}` problems.json.
    """
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("pid", rec.get("_key", f"#{i}")))
        if split is not None and rec.get("split", split) != split:
            continue
        if not rec.get("image"):
            if images_only:
                continue
            raise BadRecordError(path, rid, "no image", "use images_only=True for ScienceQA-IMG")
        choices = field(rec, "choices", path, rid, list)
        if not 2 <= len(choices) <= len(LLAVA_OPTIONS):
            raise BadRecordError(path, rid, f"{len(choices)} choices, expected 2 to 5")
        answer = field(rec, "answer", path, rid, int)
        if not 0 <= answer < len(choices):
            raise BadRecordError(path, rid, f"answer index {answer} but {len(choices)} choices")
        image = resolve(rec["image"], root, path, rid, check_media)
        meta = {
            "answer": letters(len(choices))[answer],
            "n_choices": len(choices),
            "subject": rec.get("subject"),
        }
        text = prompt(field(rec, "question", path, rid), choices, rec.get("hint") or "")
        samples.append(image_first(rid, text, [image], path, meta))
    return samples


def parse(output: str, sample_meta: Mapping, mode: str = "llava") -> str:
    """The predicted letter, or "" when the rule finds none (or one beyond the choices)."""
    # LLaVA's answer file holds the stripped generation.
    text = output.strip()
    n = int(sample_meta["n_choices"])
    if mode == "llava":
        if text in LLAVA_OPTIONS:
            answer = text
        elif len(text) >= 3 and text[0] in LLAVA_OPTIONS and text[1:3] == ". ":
            answer = text[0]
        else:
            found = _THE_ANSWER_IS.findall(text)
            answer = found[0] if len(found) == 1 else ""
        return answer if answer in LLAVA_OPTIONS[:n] else ""
    if mode == "lmms_eval":
        valid = letters(n)
        if text.upper() in valid and len(text) == 1:
            return text.upper()
        if len(text) >= 2 and text[0] in valid and text[1] == ".":
            return text[0]
        return ""
    raise ValueError(f"unknown ScienceQA parse mode {mode!r}; use 'llava' or 'lmms_eval'")


class ScienceQAAccuracy(LetterAccuracy):
    """ScienceQA-IMG accuracy ×100 (unparsed answers are wrong)."""


BENCHMARK = Benchmark(ScienceQAAccuracy, same_answer, "accuracy")
