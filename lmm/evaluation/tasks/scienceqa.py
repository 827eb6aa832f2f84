"""ScienceQA: reader, LLaVA's letter rule (`eval_science_qa.py`), Total and IMG accuracy.

Official here is LLaVA's `llava/eval/eval_science_qa.py` (haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd,
its `__main__` parsing and `get_pred_idx`), which prints `Accuracy` over every question read
(`accuracy`) and `IMG-Accuracy` over the questions with an image (`img_accuracy`). The reader
keeps the IMG subset by default (ScienceQA-IMG, the LLaVA-1.5 number); `images_only=False` reads
the text-only questions too, as LLaVA's full test run does.

Default `parse(mode="llava")` accepts exactly a letter; `"X. "` + text (length >= 3); or exactly
one regex match of `The answer is ([A-Z]).` (its `.` is any character, so "The answer is B!"
counts and "The answer is B" does not). A letter beyond the number of choices is wrong.
`mode="lmms_eval"` (EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
`lmms_eval/tasks/scienceqa/utils.py:sqa_process_results`): a letter in any case, or an upper-case
letter followed by "." ("B.", "A.dog"). Neither accepts "(B)", "B)" or "Answer: B".

Parity: tests/fixtures/official/scienceqa/{official,lmms_eval}.json.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import (
    LETTER,
    GroupedMean,
    field,
    image_first,
    records,
    resolve,
)
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer
from lmm.evaluation.tasks._choices import dotted_options, letters

# LLaVA's `args.options`: the letters its parser knows at all.
LLAVA_OPTIONS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def prompt(question: str, choices: Sequence[str], hint: str = "") -> str:
    """`Context: {hint}\\n{question}\\nA. ...` + the letter instruction (empty hint: "N/A")."""
    # ScienceQA's base prompt (reused by LLaVA's converter) writes an empty context as "N/A".
    return f"Context: {hint or 'N/A'}\n{question}\n{dotted_options(choices)}{LETTER}"


def _image(name: str, rid: str, root, source, check: bool) -> Path:
    """The official layout `{pid}/image.png` under `root`, else `name` itself if that exists."""
    official = resolve(f"{rid}/{name}", root, source, rid, False)
    if "/" in name or official.is_file():
        return resolve(name if "/" in name else f"{rid}/{name}", root, source, rid, check)
    flat = resolve(name, root, source, rid, False)
    return flat if flat.is_file() else resolve(f"{rid}/{name}", root, source, rid, check)


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    images_only: bool = True,
    split: str | None = None,
    check_media: bool = True,
) -> list[Sample]:
    """Read ScienceQA problems (`pid`, `question`, `hint`, `choices`, `answer`, `image`, `subject`).

    `images_only` keeps the IMG subset (records with an image); with `images_only=False` the
    text-only questions are read too, as prompts without media. `split` keeps one split when the
    records carry a `split` field. Accepts a list/JSON-lines or the official `{pid: record}`
    problems.json, whose `image` ("image.png") lives at `{pid}/image.png` under `root` (the
    split's image folder, e.g. `images/test`).
    """
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("pid", rec.get("_key", f"#{i}")))
        if split is not None and rec.get("split", split) != split:
            continue
        if not rec.get("image") and images_only:
            continue
        choices = field(rec, "choices", path, rid, list)
        if not 2 <= len(choices) <= len(LLAVA_OPTIONS):
            raise BadRecordError(path, rid, f"{len(choices)} choices, expected 2 to 5")
        answer = field(rec, "answer", path, rid, int)
        if not 0 <= answer < len(choices):
            raise BadRecordError(path, rid, f"answer index {answer} but {len(choices)} choices")
        images = []
        if rec.get("image"):
            images.append(_image(rec["image"], rid, root, path, check_media))
        meta = {
            "answer": letters(len(choices))[answer],
            "n_choices": len(choices),
            "subject": rec.get("subject"),
            "has_image": bool(images),
        }
        text = prompt(field(rec, "question", path, rid), choices, rec.get("hint") or "")
        samples.append(image_first(rid, text, images, path, meta))
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


class ScienceQAAccuracy(GroupedMean):
    """ScienceQA accuracy ×100 over every question (`accuracy`, LLaVA's "Accuracy") and over the
    questions with an image (`img_accuracy`, its "IMG-Accuracy"); unparsed answers are wrong."""

    def __init__(self):
        """No arguments: the task's `parse` turns outputs into letters."""
        super().__init__(["img", "text"])

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed letters with their samples' `meta` (needs `answer`; `has_image`, default
        true)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add("img" if meta.get("has_image", True) else "text", pred == meta["answer"])

    def compute(self) -> dict:
        """`accuracy` (all questions) and, when text-only questions were scored too,
        `img_accuracy` (the questions with an image; on the IMG subset it is `accuracy`)."""
        out = {"accuracy": self._overall()}
        per_group = self._per_group()
        if "img" in per_group and "text" in per_group:
            out["img_accuracy"] = per_group["img"]
        return out


BENCHMARK = Benchmark(
    ScienceQAAccuracy,
    same_answer,
    "accuracy",
    local="ScienceQA's problems.json + images/test",
    # no problem id in lmms-lab's rows: samples are numbered by row, `#0`, `#1`, ...
    hub=HubSource("lmms-lab/ScienceQA", "test", subset="ScienceQA-IMG"),
)
