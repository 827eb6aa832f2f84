r"""VideoFeedback (VideoScore-Bench): reader, score parsing and Spearman ρ×100 per dimension.

Official scorer: TIGER-AI-Lab/VideoScore @ 8e449734bbeb4aba327b82f2269e7247633a7abc,
`benchmark/eval_other_mllm.py` (gold and generated scores: `re.findall(r": (\d+)")`, then
`utils_tools.py:_ans_formatted`) and `benchmark/get_spearman_corr.py:cal_spearman_correlation`.

Gold scores are the `: (\d+)` numbers of the record's gpt turn. A generative model's answer is
parsed the same way and formatted like `_ans_formatted`: cut or padded with 0 to five scores,
anything outside 1..4 becomes 0 ("3.5" reads as 3, "visual quality:3" is skipped). A regression
head's five floats go to the metric directly. ρ is `scipy.stats.spearmanr` re-implemented (ties
get average ranks), ×100 and rounded to 4 decimals as the script stores it; a constant column
gives NaN, which the official script reports as None. `mean` is the mean of the defined
dimensions (the paper's average). Parity: `tests/fixtures/official/videofeedback/official.json`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lmm.data.sample import IMAGE_MARKER, BadRecordError, Sample
from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._base import field, interleaved, resolve, table_records
from lmm.evaluation.tasks._benchmark import Benchmark

DIMENSIONS = (
    "visual quality", "temporal consistency", "dynamic degree", "text-to-video alignment",
    "factual consistency",
)  # fmt: skip
_SCORE = re.compile(r": (\d+)")
ROUND_DIGITS = 4  # get_spearman_corr.py:ROUND_DIGIT
IMAGE = IMAGE_MARKER


def read(
    path: str | Path, root: str | Path | None = None, *, check_media: bool = True
) -> list[Sample]:
    """Read VideoFeedback test records (`id`, `images` = frame names, `conversations` human+gpt):
    a JSON file, or the Hugging Face shard `video_feedback/test-*.parquet` of
    TIGER-Lab/VideoScore-Bench that `eval_videoscore.py` loads.

    Frames live at `{root}/{id}/{frame}` as in `eval_videoscore.py`; the human turn (with its
    `<image>` markers, or the frames first) is the prompt and the gpt turn gives the gold scores.
    """
    samples = []
    for i, rec in table_records(path):
        rid = str(field(rec, "id", path, f"#{i}", object))
        turns = field(rec, ("conversations", "conversation"), path, rid, list)
        if len(turns) < 2:
            raise BadRecordError(path, rid, f"{len(turns)} turns, expected a human and a gpt turn")
        human = turns[0].get("value", turns[0].get("content"))
        bot = turns[1].get("value", turns[1].get("content"))
        if not isinstance(human, str) or not isinstance(bot, str):
            raise BadRecordError(path, rid, "turns without text")
        scores = [float(s) for s in _SCORE.findall(bot)]
        if len(scores) != len(DIMENSIONS):
            raise BadRecordError(
                path, rid, f"{len(scores)} gold scores in the gpt turn, expected {len(DIMENSIONS)}"
            )
        frames = [
            resolve(Path(rid) / f, root, path, rid, check_media) for f in rec.get("images") or []
        ]
        samples.append(interleaved(rid, human, frames, path, {"scores": scores}, IMAGE))
    return samples


def parse(output: str, sample_meta: Mapping | None = None) -> list[float]:
    """Five scores from "dim: x" lines: cut/padded with 0, values outside 1..4 set to 0."""
    scores = [int(s) for s in _SCORE.findall(output)][: len(DIMENSIONS)]
    scores += [0] * (len(DIMENSIONS) - len(scores))
    return [float(s) if s in (1, 2, 3, 4) else 0.0 for s in scores]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    sorted_x = x[order]
    i, n = 0, len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's ρ with average ranks for ties; NaN when either side is constant."""
    rx, ry = average_ranks(x.double()), average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float("nan") if denom == 0 else float((rx * ry).sum() / denom)


class VideoFeedbackSpearman(Metric):
    """Spearman ρ×100 between predicted and human scores, per dimension."""

    full_state_update = False

    def __init__(self, dimensions: Sequence[str] = DIMENSIONS):
        """
        Args:
            dimensions: names of the score columns, in order.
        """
        super().__init__()
        self.dimensions = list(dimensions)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("refs", default=[], dist_reduce_fx="cat")

    def update(
        self, predictions: Sequence[Sequence[float]] | torch.Tensor, metas: Sequence[Mapping]
    ) -> None:
        """Add score vectors (parsed or from a regression head) with their samples' `meta["scores"]`."""
        preds = torch.as_tensor(predictions, dtype=torch.float64).reshape(-1, len(self.dimensions))
        refs = torch.tensor([m["scores"] for m in metas], dtype=torch.float64)
        if preds.shape != refs.shape:
            raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
        self.preds.append(preds)
        self.refs.append(refs)

    def compute(self) -> dict:
        """One ρ×100 per dimension, rounded to 4 decimals as `get_spearman_corr.py` does (NaN for
        a constant column, where the script reports None), and their `mean` over defined ones."""
        preds, refs = dim_zero_cat(self.preds), dim_zero_cat(self.refs)
        out = {}
        for k, name in enumerate(self.dimensions):
            rho = torch.tensor(100 * spearman(preds[:, k], refs[:, k]), dtype=torch.float64)
            # numpy's round(x, 4) on the script's np.float64: rint(x * 1e4) / 1e4
            out[name] = torch.round(rho * 10**ROUND_DIGITS) / 10**ROUND_DIGITS
        defined = [v for v in out.values() if not torch.isnan(v)]
        out["mean"] = torch.stack(defined).mean() if defined else torch.tensor(float("nan"))
        return out


BENCHMARK = Benchmark(
    VideoFeedbackSpearman,
    lambda p, m, metric: None,
    "mean",
    local="test.json (or the hub shards video_feedback/test-*.parquet) + frames/<id>/",
    # the rows name frame files: give the frames folder as the task's root
    hub=HubSource("TIGER-Lab/VideoScore-Bench", "test", subset="video_feedback", media_root=True),
)
