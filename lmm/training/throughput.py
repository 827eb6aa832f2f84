"""Throughput and MFU: tokens/s, samples/s, FLOPs per step, model FLOPs utilisation, data wait.

The FLOPs of a step come from the family model (`FamilyModel.step_flops`, counted analytically
by `lmm.components.flops`); the peak is a measured matmul rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from lmm.components.flops import recomputed_flops
from lmm.data.batch import Batch
from lmm.utils.logging import get_logger

log = get_logger(__name__)


def measure_peak_flops(
    size: int = 2048,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    shapes: Sequence[tuple[int, int, int]] = (),
    device: torch.device | str = "cpu",
) -> float:
    """Matmul FLOP/s of this machine — the denominator of MFU: the best of `repeats` timings of
    each shape, over a `size`² square and `shapes` (`(m, k, n)`: `[m, k] @ [k, n]`, e.g. a
    model's own GEMMs, `gemm_shapes`), best shape taken."""
    best_rate = 0.0
    for a, b, (m, k, n) in _operands(((size, size, size), *shapes), dtype, device):
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
        best_rate = max(best_rate, 2 * m * k * n / best)
    return best_rate


def measure_sustained_flops(
    shapes: Sequence[tuple[int, int, int]],
    seconds: float = 3.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> float:
    """Matmul FLOP/s kept up for `seconds`: `shapes` (`(m, k, n)`, a Linear's layout) run in turn
    without pause, total FLOPs over the elapsed time. What a step made of nothing but these
    GEMMs could reach; on CPUs that lower their clock under sustained vector load it is below
    `measure_peak_flops`'s best short run, so it bounds an honest MFU from above."""
    if not shapes:
        raise ValueError("measure_sustained_flops needs at least one (m, k, n) shape")
    pairs = [(a, b, 2 * m * k * n) for a, b, (m, k, n) in _operands(shapes, dtype, device)]
    flops = 0
    _sync(device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a, b, f in pairs:
            a @ b
            flops += f
        _sync(device)
    return flops / (time.perf_counter() - start)


def _operands(
    shapes: Sequence[tuple[int, int, int]], dtype: torch.dtype, device: torch.device | str
) -> Iterator[tuple[Tensor, Tensor, tuple[int, int, int]]]:
    """Random `[m, k]` and `[k, n]` operands of each shape, in a Linear's layout
    (`x @ weightᵀ`), each pair multiplied once (warm-up) before it is handed out."""
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(n, k, dtype=dtype, device=device).t()
        a @ b
        yield a, b, (m, k, n)


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gemm_shapes(module: nn.Module, tokens: int, limit: int = 4) -> list[tuple[int, int, int]]:
    """The `limit` GEMMs of `module`'s Linear layers that take the most FLOPs at `tokens` tokens,
    as `(tokens, in, out)` (a decoder's hidden x {hidden, qkv, mlp} shapes): what a step's
    matmuls can reach at the model's own sizes."""
    flops: dict[tuple[int, int, int], int] = {}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            shape = (tokens, m.in_features, m.out_features)
            flops[shape] = flops.get(shape, 0) + m.in_features * m.out_features
    return sorted(flops, key=flops.__getitem__, reverse=True)[:limit]


class ThroughputMonitor(L.Callback):
    """Logs `perf/tokens_per_s`, `perf/samples_per_s`, `perf/flops_per_step`, `perf/mfu`,
    `perf/hfu` (MFU counting the forward that activation checkpointing recomputes; equal to MFU
    without it), `perf/data_wait_share` (the share of step time spent waiting for the next
    batch) and, with a measured peak, `perf/mfu_peak_spread`.

    A measured peak is taken before the first step and again after a logged window (not
    timed): the best of a 2048² matmul and the model's own largest GEMMs at the batch's token
    count, up to 4096 (`gemm_shapes`). A window measured after divides by the larger of the
    peaks around it (logged as `perf/peak_flops`), so a slow moment of a shared machine during
    one measurement cannot push MFU up; `perf/mfu_peak_spread` is (max - min) / max of the two.
    Measuring takes time a fit does not train (a few seconds a time for an 8B model's GEMMs on
    a CPU), so after a window it runs only while the measurements so far have taken less than
    `peak_budget` of the fit's time; other windows divide by the last peak measured.
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        log_every_n_steps: int = 10,
        peak_budget: float | None = 0.01,
    ):
        """
        Args:
            peak_flops: the hardware's peak FLOP/s for MFU (per device); None measures matmuls
                before the first step and after windows (`lmm bench peak` prints the square's
                number).
            log_every_n_steps: how often to log.
            peak_budget: the share of the fit's time that measuring the peak may take (0.01:
                1%); None measures after every window (benchmarks).
        """
        if peak_budget is not None and peak_budget < 0:
            raise ValueError(f"peak_budget must be >= 0 or None, got {peak_budget}")
        self.peak_flops = peak_flops
        self.measure = peak_flops is None
        self.peak_budget = peak_budget
        self.measuring_s = 0.0  # time spent measuring peaks so far
        self.measurements = 0
        self._first: float | None = None  # when the first measurement started
        self.every = log_every_n_steps
        self.shapes: list[tuple[int, int, int]] = []
        self.dtype = torch.float32
        self._end = None
        self._start = 0.0
        self._wait = 0.0
        self._acc = {
            "time": 0.0,
            "wait": 0.0,
            "tokens": 0,
            "samples": 0,
            "flops": 0.0,
            "recomputed": 0.0,
            "steps": 0,
        }

    def on_fit_start(self, trainer, module) -> None:
        precision = str(trainer.precision)
        self.dtype = torch.bfloat16 if "bf16" in precision else torch.float32

    def _measure_peak(self, module) -> float:
        start = time.perf_counter()
        if self._first is None:
            self._first = start
        peak = measure_peak_flops(dtype=self.dtype, shapes=self.shapes, device=module.device)
        self.measuring_s += time.perf_counter() - start
        self.measurements += 1
        log.info("measured matmul peak: %.1f GFLOP/s (%s)", peak / 1e9, self.dtype)
        return peak

    def _may_measure(self, now: float) -> bool:
        """Whether measuring again keeps the measurements within `peak_budget` of the fit."""
        if self.peak_budget is None or self._first is None:
            return True
        return self.measuring_s < self.peak_budget * (now - self._first)

    @staticmethod
    def batch_flops(module, batch: Batch) -> float:
        """Training FLOPs of `batch`: the family model's count (`FamilyModel.step_flops`)."""
        return module.model.step_flops(batch, module.objective.head_tokens(module, batch))

    @staticmethod
    def batch_recomputed_flops(module, batch: Batch) -> float:
        """Forward FLOPs that activation checkpointing runs again in the backward of `batch`."""
        llm = getattr(module.model, "llm", None)
        return 0.0 if llm is None else recomputed_flops(llm, batch)

    def on_train_batch_start(self, trainer, module, batch: Batch, batch_idx: int) -> None:
        if self.measure and self.peak_flops is None:
            # rows past a few thousand add time, not rate
            self.shapes = gemm_shapes(module.model, min(batch.input_ids.numel(), 4096))
            self.peak_flops = self._measure_peak(module)
        now = time.perf_counter()
        self._wait = now - self._end if self._end is not None else 0.0
        self._start = now

    def on_train_batch_end(self, trainer, module, outputs, batch: Batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self._end = now
        if not len(batch):
            return  # a skipped step (every sample was a bad record): nothing was computed
        acc = self._acc
        acc["time"] += now - self._start + self._wait
        acc["wait"] += self._wait
        acc["tokens"] += batch.num_tokens
        rows = batch.seq_lens or [[1]] * len(batch)
        acc["samples"] += (
            sum(1 for row in rows for k in row if k > 1) if batch.seq_lens else len(batch)
        )
        acc["flops"] += self.batch_flops(module, batch)
        acc["recomputed"] += self.batch_recomputed_flops(module, batch)
        acc["steps"] += 1
        if (trainer.global_step % self.every) == 0 and acc["time"] > 0:
            world = trainer.world_size
            achieved = acc["flops"] / acc["time"]
            metrics = {}
            peak = self.peak_flops
            if self.measure and self._may_measure(now):  # after the window, out of its time
                after = self._measure_peak(module)
                peak = max(self.peak_flops, after)
                metrics["perf/mfu_peak_spread"] = abs(self.peak_flops - after) / peak
                self.peak_flops = after  # the next window's "before"
                self._end = time.perf_counter()
            if achieved > peak:
                log.warning(
                    "MFU %.2f > 1: the step ran faster than the matmul peak (%.1f GFLOP/s); "
                    "the peak was measured at a slow moment or peak_flops is set too low",
                    achieved / peak,
                    peak / 1e9,
                )
            metrics.update(
                {
                    "perf/tokens_per_s": acc["tokens"] * world / acc["time"],
                    "perf/samples_per_s": acc["samples"] * world / acc["time"],
                    "perf/flops_per_step": acc["flops"] / acc["steps"],
                    "perf/mfu": achieved / peak,
                    "perf/hfu": (acc["flops"] + acc["recomputed"]) / acc["time"] / peak,
                    "perf/peak_flops": peak,
                    "perf/data_wait_share": acc["wait"] / acc["time"],
                }
            )
            module.log_dict(metrics, batch_size=len(batch))
            self._acc = dict.fromkeys(acc, 0)
