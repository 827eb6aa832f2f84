"""NLVR2 as Mantis evaluates it: Mantis-Eval records and prompts, plus the true/false fallback.

When no valid option letter is found, Mantis accepts an answer holding exactly one of "true" /
"false" (case-insensitive) if the gold option holds the same word. lmms-eval has no such branch.
"""

from __future__ import annotations

from lmm.evaluation.tasks._benchmark import Benchmark
from lmm.evaluation.tasks.mantis_eval import MantisAccuracy, is_correct, parse, prompt, read

__all__ = ["BENCHMARK", "NLVR2Accuracy", "parse", "prompt", "read"]


def NLVR2Accuracy() -> MantisAccuracy:  # noqa: N802 - a metric factory reads like a class
    """The NLVR2 metric: `MantisAccuracy(nlvr2=True)`."""
    return MantisAccuracy(nlvr2=True)


BENCHMARK = Benchmark(
    NLVR2Accuracy, lambda p, m, metric: float(is_correct(p, m, nlvr2=True)), "accuracy"
)
