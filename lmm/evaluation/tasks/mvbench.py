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
from lmm.evaluation.hub import HubSource
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

# Each task's video folder under the videos' root, where the records give bare file names:
# the official notebook's `data_list` prefixes (OpenGVLab/Ask-Anything @ 4631cd62923152988c4d850ddcb5227f24231393,
# `video_chat2/mvbench.ipynb`, the layout of the dataset's main revision) and lmms-eval's
# `DATA_LIST` (EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
# `lmms_eval/tasks/mvbench/utils.py`, the layout of its `video` revision's archives, where
# clevrer and star may also sit under `data0613/`).
NOTEBOOK_FOLDERS = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos", "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}  # fmt: skip
LMMS_EVAL_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa", "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "scene_transition": "scene_qa/video",
    "state_change": "perception/videos", "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4", "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation", "action_count": "perception/videos",
}  # fmt: skip


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
    `video` is relative to `root` (default: the file's folder); a bare name that is not there
    is looked for in the task's folder of the published layouts (`NOTEBOOK_FOLDERS`, the
    dataset's main revision; `LMMS_EVAL_FOLDERS`, its `video` revision), so `root` may be the
    folder the dataset's video archives were extracted to.
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
        video = _video(field(rec, "video", path, rid), task_name(str(name)), root, path, rid)
        if check_media and not video.is_file():
            resolve(video, root, path, rid, True)  # the error names the path looked for
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


def _video(rel: str, task: str, root, source, rid: str) -> Path:
    """`root/rel`, else the first existing `root/<task folder>/rel` of the published layouts."""
    direct = resolve(rel, root, source, rid, False)
    if direct.is_file() or Path(rel).is_absolute():
        return direct
    folders = [NOTEBOOK_FOLDERS.get(task), LMMS_EVAL_FOLDERS.get(task)]
    folders += [f"data0613/{f}" for f in folders if f and f.startswith(("clevrer/", "star/"))]
    for folder in filter(None, folders):
        candidate = resolve(f"{folder}/{rel}", root, source, rid, False)
        if candidate.is_file():
            return candidate
    return direct


def _hub_records(rows, hub):
    """OpenGVLab/MVBench rows (`video`, `question`, `candidates`, `answer`; one subset per
    task): the task is the subset's name."""
    for row in rows:
        yield {"task": hub.subset, **row}


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
    MVBenchAccuracy,
    lambda p, m, metric: float(check_ans(p, m["answer"])),
    "accuracy",
    local="OpenGVLab/MVBench json/<task>.json + its extracted video/ archives",
    # lmms-eval reads the `video` revision, one subset per task; the videos are not in the rows
    hub=HubSource(
        "OpenGVLab/MVBench",
        "train",
        subsets=TASKS,
        revision="video",
        records=_hub_records,
        media_root=True,
    ),
)
