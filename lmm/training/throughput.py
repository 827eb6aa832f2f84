"""Throughput and MFU: tokens/s, samples/s, FLOPs per step, model FLOPs utilisation, data wait.

FLOPs are counted analytically per batch, as PaLM's MFU does: a matmul weight of N
parameters costs 2·N FLOPs per token forward, and the backward pass 2·N more for the
activation gradients (if anything before it trains) plus 2·N for the weight gradients (if
it trains); attention adds 4·d·L² per layer and row forward. The vision tower, the connector
and the LLM are counted apart, with their own token counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from lmm.data.batch import Batch
from lmm.utils.logging import get_logger

log = get_logger(__name__)


def matmul_params(module: nn.Module) -> tuple[int, int]:
    """(weights of its Linear/Conv layers, of which trainable): the parameters matmuls touch."""
    total = trainable = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n = m.weight.numel()
            total += n
            trainable += n if m.weight.requires_grad else 0
    return total, trainable


def _pass_multiplier(trains: bool, grad_flows_in: bool) -> int:
    """FLOPs per weight and token over forward + backward: 2 fwd, +2 input grads, +2 weight grads."""
    return 2 + (2 if grad_flows_in else 0) + (2 if trains else 0)


def step_flops(
    parts: dict[str, nn.Module],
    batch: Batch,
    vision_tokens: tuple[int, int],
    llm_shape: tuple[int, int],
    vision_shape: tuple[int, int] = (0, 0),
) -> float:
    """Training FLOPs of one batch over vision tower, connector and LLM (forward + backward).

    `vision_tokens` is (tokens the encoder runs on, tokens it hands the connector) per image;
    `llm_shape` and `vision_shape` are (layers, width), for the attention term.
    """
    n_images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    tokens = batch.num_tokens
    order = [
        ("vision", n_images * vision_tokens[0]),
        ("connector", n_images * vision_tokens[1]),
        ("llm", tokens),
    ]
    trains = {name: matmul_params(parts[name])[1] > 0 for name, _ in order if name in parts}
    flops = 0.0
    for i, (name, n_tokens) in enumerate(order):
        if name not in parts:
            continue
        total, _ = matmul_params(parts[name])
        upstream = any(trains.get(prev, False) for prev, _ in order[:i])
        flops += _pass_multiplier(trains[name], upstream) * total * n_tokens
    # attention scores and values: 4·d·L² per layer and sequence forward (×3 with backward when
    # gradients pass through it), in the LLM per sample and in the vision tower per image
    rows: Sequence[Sequence[int]] = batch.seq_lens or [[int(m.sum())] for m in batch.attention_mask]
    layers, width = llm_shape
    llm_back = 3 if any(trains.values()) else 1
    flops += llm_back * 4 * width * layers * sum(k * k for row in rows for k in row if k > 1)
    v_layers, v_width = vision_shape
    v_back = 3 if trains.get("vision") else 1
    flops += v_back * 4 * v_width * v_layers * n_images * vision_tokens[0] ** 2
    return flops


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
        llm = module.llm.config
        self._llm = (llm.num_hidden_layers, llm.hidden_size)
        spec = module.media_spec()
        size = spec.transform.size
        vision = getattr(spec, "vision", None)
        seq = getattr(vision, "sequence_length", None)
        self._vision_tokens = (
            (
                seq((size, size)) if seq else vision.num_tokens((size, size)),
                vision.num_tokens((size, size)),
            )
            if vision is not None
            else (0, 0)
        )
        config = getattr(getattr(vision, "model", None), "config", None)
        self._vision = (config.num_hidden_layers, config.hidden_size) if config else (0, 0)

    def on_train_batch_start(self, trainer, module, batch: Batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self._wait = now - self._end if self._end is not None else 0.0
        self._start = now

    def on_train_batch_end(self, trainer, module, outputs, batch: Batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self._end = now
        acc = self._acc
        acc["time"] += now - self._start + self._wait
        acc["wait"] += self._wait
        acc["tokens"] += batch.num_tokens
        rows = batch.seq_lens or [[1]] * len(batch)
        acc["samples"] += (
            sum(1 for row in rows for k in row if k > 1) if batch.seq_lens else len(batch)
        )
        acc["flops"] += step_flops(
            module.parts(), batch, self._vision_tokens, self._llm, self._vision
        )
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
