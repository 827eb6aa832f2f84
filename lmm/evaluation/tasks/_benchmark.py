"""`Benchmark`: how `lmm` scores a benchmark by default, declared once in the benchmark's module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchmetrics import Metric

from lmm.data.sample import Sample

if TYPE_CHECKING:
    from lmm.evaluation.hub import HubSource


@dataclass(frozen=True)
class Benchmark:
    """A benchmark module's defaults; the module declares them as `BENCHMARK = Benchmark(...)`."""

    metric: Callable[..., Metric]  # the official-rule metric (a class or factory)
    score: Callable[[Any, Mapping, Metric], float | None]  # one sample's score in [0, 1], or None
    headline: str  # the metric key a report shows
    scale: float = 100.0  # the headline's best value (MME perception: 2000)
    # keyword arguments of `metric` taken from the samples read (DEMON's datasets), if any
    metric_args: Callable[[list[Sample]], dict[str, Any]] | None = None
    # the published local files the reader takes (the eval recipe's default), in a few words
    local: str = ""
    # the lmms-eval hub dataset and how its rows become local records (`path: hf:...`), if any
    hub: HubSource | None = None

    def build_metric(self, samples: list[Sample]) -> Metric:
        """The default metric of a task that read `samples`."""
        return self.metric(**(self.metric_args(samples) if self.metric_args else {}))


def same_answer(parsed, meta: Mapping, metric: Metric) -> float:
    """1.0 when the parsed answer equals `meta["answer"]`, else 0.0 (a `Benchmark.score`)."""
    return float(parsed == meta["answer"])
