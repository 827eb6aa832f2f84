"""NLVR2 as Mantis evaluates it: Mantis-Eval records and prompts, plus the true/false fallback.

Official scorer: TIGER-AI-Lab/Mantis @ f3a319202d882a1794d28440b77bba7c58869a9e,
`mantis/benchmark/eval.py:get_prediction(..., dataset_name="nlvr2")` (run by
`eval_single_model.sh` on TIGER-Lab/NLVR2, split test). When no valid option letter is found,
an answer holding "true" and not "false" (or the reverse; case-insensitive, substrings count:
"untrue" says true) is right if the gold option holds the same word. lmms-eval has no such
branch. Parity: `tests/fixtures/official/nlvr2/official.json`."""

from __future__ import annotations

from lmm.evaluation.hub import HubSource
from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks.mantis_eval import MantisAccuracy, is_correct, parse, prompt, read

__all__ = ["BENCHMARK", "NLVR2Accuracy", "parse", "prompt", "read"]


def NLVR2Accuracy() -> MantisAccuracy:  # noqa: N802 - a metric factory reads like a class
    """The NLVR2 metric: `MantisAccuracy(nlvr2=True)`."""
    return MantisAccuracy(nlvr2=True)


BENCHMARK = Benchmark(
    NLVR2Accuracy,
    lambda p, m, metric: float(is_correct(p, m, nlvr2=True)),
    "accuracy",
    local="nlvr2_test.json (Mantis-Eval format) + images, or the hub shards nlvr2/test-*.parquet",
    hub=HubSource("TIGER-Lab/NLVR2", "test", subset="nlvr2"),
)
