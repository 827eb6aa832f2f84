"""Q-Bench (A1): reader and the only rule-based scorer, lmms-eval's MMMU-style parser.

The official dev scoring uses a GPT judge. lmms-eval (`tasks/qbench/utils.py`) reuses MMMU's
multiple-choice parser with an unseeded random fallback and crashes (NameError on `np`) on
ambiguous outputs such as "A B"; here the fallback is seeded with 42 and ties are resolved as
MMMU does (last occurrence wins), so the score is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.tasks._base import LETTER, LetterAccuracy, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer
from lmm.evaluation.tasks._choices import dotted_options, letters, mmmu_choice

# Q-Bench's own generator, so that its draws do not depend on how many MMMU answers came first.
QBENCH_RNG = random.Random(42)
PADDING = "N/A"


def prompt(question: str, options: Sequence[str]) -> str:
    """`q\\nA. x\\nB. y\\n` + the letter instruction."""
    return f"{question}\n{dotted_options(options)}\n{LETTER}"


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read Q-Bench A1 (`id`, `question`, `option0..3` padded with "N/A", `correct_choice`, `image`)."""
    samples = []
    for i, rec in records(path):
        rid = str(rec.get("id", f"#{i}"))
        options = [
            str(rec[f"option{k}"])
            for k in range(4)
            if rec.get(f"option{k}") is not None and str(rec[f"option{k}"]) != PADDING
        ]
        if len(options) < 2:
            raise BadRecordError(path, rid, f"{len(options)} real options, expected at least 2")
        choices = letters(len(options))
        gold = field(rec, "correct_choice", path, rid, object)
        # Published as a letter ("B") or as an option index (1).
        answer = choices[gold] if isinstance(gold, int) and 0 <= gold < len(choices) else str(gold)
        if answer not in choices:
            raise BadRecordError(path, rid, f"correct_choice {gold!r} not among {choices}")
        image = resolve(field(rec, ("image", "img_path"), path, rid), root, path, rid, check_media)
        meta = {
            "answer": answer,
            "all_choices": choices,
            "index2ans": dict(zip(choices, options, strict=True)),
            "question_type": rec.get("question_type"),
            "question_concern": rec.get("question_concern"),
        }
        samples.append(
            image_first(
                rid, prompt(field(rec, "question", path, rid), options), [image], path, meta
            )
        )
    return samples


def parse(output: str, sample_meta: Mapping, rng: random.Random | None = None) -> str:
    """MMMU's multiple-choice parser on the sample's options, random fallback seeded with 42."""
    return mmmu_choice(
        output, sample_meta["all_choices"], sample_meta["index2ans"], rng or QBENCH_RNG
    )


class QBenchAccuracy(LetterAccuracy):
    """Q-Bench A1 accuracy ×100."""


BENCHMARK = Benchmark(QBenchAccuracy, same_answer, "accuracy")
