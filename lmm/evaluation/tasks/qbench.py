"""Q-Bench (A1, LLVisionQA): reader, lmms-eval's rule-based scorer and its per-concern/type breakdown.

Official: Q-Future/Q-Bench @ f19783ea1890212794ab220c90c7f71342a6289b has no scorer: A1 is scored
by the authors from submitted answers (README "Submission Guideline for A1/A2"); its README sends
users to lmms-eval (2024/6/17) and VLMEvalKit. lmm therefore scores with lmms-eval's rule:
EvolvingLMMs-Lab/lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
`lmms_eval/tasks/qbench/utils.py`: `q_bench_process_results` (options up to the first "N/A"),
`parse_multi_choice_response` and `q_bench_aggregate_results`.

Its parser is not MMMU's: after `(X)` it looks for `"{X} "` (no leading space, so "C. Low" is
not C there but "A " inside "DATA " is A), then `"{X}."` ("C. Low" reads as C), then the option
text (more than 5 words), else `random.choice`; with several candidates the last occurrence wins
(`np.argmax` of the `rfind`s, ties to the first). lmms-eval's module never imports numpy, so
every several-candidates case raises NameError there; lmm returns what `np.argmax` would.
The random fallback: lmms-eval seeds the global generator with 0 (`--seed` default) and shares it
with other code; lmm draws from a generator seeded with `seed` (0) per read of the file, in parse
order, so its draws are reproducible (lmms-eval's need not be).
The breakdown is lmms-eval's: accuracy per concern ("Global Distortion", ...) and per type
("Yes/No", "How", "What"); `accuracy` is its "Overall" (`calculate_ins_level_acc` over both
partitions, i.e. per sample; lmms-eval rounds it to 5 decimals, lmm does not).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import LETTER, GroupedMean, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark, same_answer
from lmm.evaluation.tasks._choices import dotted_options, letters, mmmu_choice
from lmm.evaluation.tasks.mmmu import new_stream, stream

PADDING = "N/A"
SEED = 0  # lmms-eval's default `--seed` (random.seed(0) in simple_evaluate)
# lmms_eval/tasks/qbench/utils.py: concern_list, question_list (the records hold their indices)
CONCERNS = ("Global Distortion", "Global Others", "Local Distortion", "Local Others")
TYPES = ("Yes/No", "How", "What")


def prompt(question: str, options: Sequence[str]) -> str:
    """`q\\nA. x\\nB. y\\n` + the letter instruction."""
    return f"{question}\n{dotted_options(options)}\n{LETTER}"


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read Q-Bench A1 as lmms-eval's `q-future/Q-Bench-HF` ships it: `id`, `question`,
    `option0..3` padded with "N/A", `correct_choice` (a letter, or an option index),
    `question_type` and `question_concern` (indices into `TYPES` / `CONCERNS`, or their names),
    `image` (or `img_path`). The options are those before the first "N/A", as
    `q_bench_process_results` takes them. Also LLVisionQA's own `llvisionqa_dev.json`
    (`img_path`, `question`, `candidates`, `correct_ans` text, `type`, `concern` indices)."""
    samples = []
    key = new_stream(path)
    for i, rec in records(path):
        rid = str(rec.get("id", f"#{i}"))
        if "candidates" in rec:  # LLVisionQA's own json
            options = [str(c) for c in field(rec, "candidates", path, rid, list)]
            gold = str(field(rec, "correct_ans", path, rid, object))
            if gold not in options:
                raise BadRecordError(path, rid, f"correct_ans {gold!r} not among {options}")
            # the LLaVA / Q-Future scripts keep the last candidate equal to correct_ans
            gold = len(options) - 1 - options[::-1].index(gold)
        else:
            options = []
            for k in range(4):
                option = rec.get(f"option{k}")
                if option is None or str(option) == PADDING:
                    break
                options.append(str(option))
            gold = field(rec, "correct_choice", path, rid, object)
        if len(options) < 2:
            raise BadRecordError(path, rid, f"{len(options)} real options, expected at least 2")
        choices = letters(len(options))
        answer = choices[gold] if isinstance(gold, int) and 0 <= gold < len(choices) else str(gold)
        if answer not in choices:
            raise BadRecordError(path, rid, f"correct_choice {gold!r} not among {choices}")
        image = resolve(field(rec, ("image", "img_path"), path, rid), root, path, rid, check_media)
        meta = {
            "answer": answer,
            "all_choices": choices,
            "index2ans": dict(zip(choices, options, strict=True)),
            "question_type": _name(
                rec.get("question_type", rec.get("type")), TYPES, path, rid, "question_type"
            ),
            "question_concern": _name(
                rec.get("question_concern", rec.get("concern")), CONCERNS, path, rid, "concern"
            ),
            "stream": key,
        }
        samples.append(
            image_first(
                rid, prompt(field(rec, "question", path, rid), options), [image], path, meta
            )
        )
    return samples


def _name(value, names: Sequence[str], path, rid: str, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and value in names:
        return value
    raise BadRecordError(path, rid, f"{what} {value!r} is not an index of or one of {list(names)}")


def lmms_eval_choice(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random
) -> str:
    """lmms-eval's Q-Bench `parse_multi_choice_response`: `(X)`, `X `, `X.`, option text, random
    (MMMU's parser with two other bare-letter stages)."""
    return mmmu_choice(response, all_choices, index2ans, rng, letter_forms=("{} ", "{}."))


def parse(
    output: str,
    sample_meta: Mapping,
    mode: str = "lmms_eval",
    seed: int = SEED,
    rng: random.Random | None = None,
) -> str:
    """The option letter by lmms-eval's rule; the random fallback from `rng`, else from the
    file's generator seeded with `seed`."""
    if mode != "lmms_eval":
        raise ValueError(f"unknown Q-Bench parse mode {mode!r}; use 'lmms_eval'")
    rng = rng or stream(sample_meta.get("stream"), seed) or random.Random(seed)
    return lmms_eval_choice(output, sample_meta["all_choices"], sample_meta["index2ans"], rng)


class QBenchAccuracy(GroupedMean):
    """Q-Bench A1 accuracy ×100: overall, per concern and per question type (lmms-eval's)."""

    def __init__(self):
        """No arguments: the groups are lmms-eval's concerns and question types."""
        super().__init__(["all", *CONCERNS, *TYPES])

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed letters with their samples' `meta` (needs `answer`; `question_concern`
        and `question_type` when present)."""
        for pred, meta in zip(predictions, metas, strict=True):
            right = pred == meta["answer"]
            self._add("all", right)
            for group in (meta.get("question_concern"), meta.get("question_type")):
                if group is not None:
                    self._add(group, right)

    def compute(self) -> dict:
        """`accuracy` (lmms-eval's "Overall", per sample) and one entry per concern and type seen."""
        per_group = self._per_group()
        per_group.pop("all", None)
        overall = 100 * self.sums[0] / self.counts[0].clamp(min=1)
        return {"accuracy": overall, **per_group}


BENCHMARK = Benchmark(
    QBenchAccuracy,
    same_answer,
    "accuracy",
    local="LLVisionQA's llvisionqa_dev.json + images",
    hub=HubSource("q-future/Q-Bench-HF", "dev"),
)
