"""MVBench: reader, the official prompt (assistant pre-filled with "Best option:(") and `check_ans`.

Official: OpenGVLab/Ask-Anything @ 4dd8210b030374bb0c510a57dfbe916f70d3ef71,
`video_chat2/mvbench.ipynb`: `answer` strips the decoded text, `infer_mvbench` returns
"(" + `llm_message.strip().split('\n')[0]`, and `check_ans(pred, gt)` is right if the first
space-separated token of the prediction, lower-cased and without ".", is a substring of the gold
"(a)" token, or the reverse. So an empty output ("(") counts as **correct**, " B" reads as "(B"
(not "( B", whose token "(" would match any option), and "The answer is A" is wrong. The gold is
`qa_template`'s "(X) text", X the *last* candidate equal to the answer. The total (`final_res['Avg']`)
is correct / total over all samples; `macro` is the mean of the task accuracies (equal on the
published data, 200 per task). lmms-eval's `mcq_acc` is not offered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmm.data.sample import BadRecordError, Sample
from lmm.evaluation.tasks._base import GroupedMean, field, image_first, records, resolve
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks._choices import letters, paren_options

SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail "
    "and movement of objects, and the action and pose of persons. Based on your observations, "
    "select the best option that accurately addresses the question.\n"
)
QUESTION_PROMPT = "\nOnly give the best option."
ANSWER_PREFIX = "Best option:("
TASKS = (
    "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle",
    "moving_direction", "action_localization", "scene_transition", "action_count",
    "moving_count", "moving_attribute", "state_change", "fine_grained_pose", "character_order",
    "egocentric_navigation", "episodic_reasoning", "counterfactual_inference",
)  # fmt: skip


def prompt(question: str, candidates: Sequence[str]) -> str:
    """`Question: q\\nOptions:\\n(A) x\\n(B) y` + "\\nOnly give the best option."."""
    return f"Question: {question}\nOptions:\n{paren_options(candidates)}{QUESTION_PROMPT}"


def task_name(name: str) -> str:
    """The task's file stem from the official display name: "Fine-grained Action" ->
    "fine_grained_action" (stems pass unchanged)."""
    return re.sub(r"[\s-]+", "_", name.strip()).lower()


def read(
    path: str | Path,
    root: str | Path | None = None,
    *,
    task: str | None = None,
    check_media: bool = True,
) -> list[Sample]:
    """Read MVBench (`video`, `question`, `candidates`, `answer` text): one file per task
    (`json/action_sequence.json`, as published) or one file of all tasks whose records carry
    `task_type` (the official notebook's display name, "Action Sequence", or the file stem).

    The task is the record's `task_type` or `task`, else `task=`, else the file stem.
    `meta["assistant_prefix"]` holds the text the official code pre-fills the answer with.
    """
    samples = []
    for i, rec in records(path):
        name = rec.get("task_type") or rec.get("task") or task or Path(path).stem
        rid = str(rec.get("id", f"{task_name(str(name))}-{i}"))
        candidates = [str(c) for c in field(rec, "candidates", path, rid, list)]
        answer = str(field(rec, "answer", path, rid, object))
        if answer not in candidates:
            raise BadRecordError(path, rid, f"answer {answer!r} is not among the candidates")
        video = resolve(field(rec, "video", path, rid), root, path, rid, check_media)
        # `qa_template` keeps the last candidate equal to the answer.
        index = len(candidates) - 1 - candidates[::-1].index(answer)
        letter = letters(len(candidates))[index]
        meta = {
            "answer": f"({letter}) {answer}",
            "task": task_name(str(name)),
            "media": "video",
            "assistant_prefix": ANSWER_PREFIX,
        }
        text = prompt(field(rec, "question", path, rid), candidates)
        samples.append(image_first(rid, text, [video], path, meta, system=SYSTEM))
    return samples


def parse(output: str, sample_meta: Mapping | None = None) -> str:
    """ "(" + the first line of the continuation after the pre-filled "Best option:(", as the
    official `answer` + `infer_mvbench` cut it: before "###", after the last "Assistant:", stripped."""
    text = output.split("###")[0].split("Assistant:")[-1].strip()
    return "(" + text.strip().split("\n")[0]


def check_ans(prediction: str, gold: str) -> bool:
    """Official `check_ans` on the option tokens: one must contain the other."""
    pred_option = prediction.lower().split(" ")[0]
    gold_option = gold.lower().split(" ")[0]
    return pred_option.replace(".", "") in gold_option or gold_option in pred_option


class MVBenchAccuracy(GroupedMean):
    """MVBench accuracy ×100: over all samples (official `Avg`), mean over tasks, and per task."""

    def __init__(self, tasks: Sequence[str] = TASKS):
        """
        Args:
            tasks: the task names a sample's `meta["task"]` may take (default: the 20 file stems).
        """
        super().__init__(tasks)

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add `parse` outputs with their samples' `meta` (needs `answer`, `task`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add(meta["task"], check_ans(pred, meta["answer"]))

    def compute(self) -> dict:
        """`accuracy` (official `Avg`: per sample; also `micro`), `macro` (mean over tasks) and
        one entry per task (the official `final_res[task]`)."""
        micro = self._overall()
        return {"accuracy": micro, "micro": micro, "macro": self._macro(), **self._per_group()}


BENCHMARK = Benchmark(
    MVBenchAccuracy, lambda p, m, metric: float(check_ans(p, m["answer"])), "accuracy"
)
