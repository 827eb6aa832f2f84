"""Throughput and MFU: tokens/s, samples/s, FLOPs per step, model FLOPs utilisation, data wait.

The FLOPs of a step come from the family model (`FamilyModel.step_flops`, counted analytically
by `lmm.components.flops`); the peak is a measured matmul rate.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from lmm.data.batch import Batch
from lmm.utils.logging import get_logger

log = get_logger(__name__)


def measure_peak_flops(
    size: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> float:
    """Matmul FLOP/s of this machine (best of `repeats`) — the denominator of MFU."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class ThroughputMonitor(L.Callback):
    """Logs `perf/tokens_per_s`, `perf/samples_per_s`, `perf/flops_per_step`, `perf/mfu` and
    `perf/data_wait_share` (the share of step time spent waiting for the next batch)."""

    def __init__(self, peak_flops: float | None = None, log_every_n_steps: int = 10):
        """
        Args:
            peak_flops: the hardware's peak FLOP/s for MFU (per device); None measures a matmul
                at fit start (`lmm bench peak` prints the same number).
            log_every_n_steps: how often to log.
        """
        self.peak_flops = peak_flops
        self.every = log_every_n_steps
        self._end = None
        self._start = 0.0
        self._wait = 0.0
        self._acc = {"time": 0.0, "wait": 0.0, "tokens": 0, "samples": 0, "flops": 0.0, "steps": 0}

    def on_fit_start(self, trainer, module) -> None:
        if self.peak_flops is None:
            precision = str(trainer.precision)
            dtype = torch.bfloat16 if "bf16" in precision else torch.float32
            self.peak_flops = measure_peak_flops(dtype=dtype)
            log.info("measured matmul peak: %.1f GFLOP/s (%s)", self.peak_flops / 1e9, dtype)

    @staticmethod
    def batch_flops(module, batch: Batch) -> float:
        """Training FLOPs of `batch`: the family model's count (`FamilyModel.step_flops`)."""
        return module.model.step_flops(batch, module.objective.head_tokens(module, batch))

    def on_train_batch_start(self, trainer, module, batch: Batch, batch_idx: int) -> None:
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
        acc["steps"] += 1
        if (trainer.global_step % self.every) == 0 and acc["time"] > 0:
            world = trainer.world_size
            achieved = acc["flops"] / acc["time"]
            module.log_dict(
                {
                    "perf/tokens_per_s": acc["tokens"] * world / acc["time"],
                    "perf/samples_per_s": acc["samples"] * world / acc["time"],
                    "perf/flops_per_step": acc["flops"] / acc["steps"],
                    "perf/mfu": achieved / self.peak_flops,
                    "perf/data_wait_share": acc["wait"] / acc["time"],
                },
                batch_size=len(batch),
            )
            self._acc = dict.fromkeys(acc, 0)
