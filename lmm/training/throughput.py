"""Throughput and MFU: tokens/s, samples/s, FLOPs per step, model FLOPs utilisation, data wait.

FLOPs are counted analytically per batch, as PaLM's MFU does: a matmul weight of N
parameters costs 2·N FLOPs per token forward, and the backward pass 2·N more for the
activation gradients (if it or anything before it trains) plus 2·N for the weight gradients
(if it trains); attention adds 4·d·L² per layer and row forward (×3 with its backward). The
parts of a family are counted apart, each with its own token count: vision tower, connector
and LLM (`step_flops`); for the Q-Former family also the Q-Former and VPG-C
(`qformer_step_flops`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from lmm.data.batch import Batch
from lmm.training.strategies import layer_list
from lmm.utils.logging import get_logger

log = get_logger(__name__)

# The Q-Former's matmuls that read the vision features (the others read its queries).
_MEMORY_SIDE = ("crossattention.attention.key", "crossattention.attention.value")


def matmul_params(module: nn.Module) -> tuple[int, int]:
    """(weights of its Linear/Conv layers, of which trainable): the parameters matmuls touch."""
    total = trainable = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n = m.weight.numel()
            total += n
            trainable += n if m.weight.requires_grad else 0
    return total, trainable


def trains(module: nn.Module) -> bool:
    """True if any parameter of `module` is trained (gradients must reach it)."""
    return any(p.requires_grad for p in module.parameters())


def _weight_flops(weight: torch.Tensor, tokens: int, grad_in: bool) -> float:
    """Forward + backward FLOPs of one matmul weight applied to `tokens` tokens."""
    return tokens * weight.numel() * (2 + 2 * grad_in + 2 * weight.requires_grad)


def matmul_flops(module: nn.Module, tokens: int, grad_in: bool) -> float:
    """Forward + backward FLOPs of every Linear/Conv of `module` applied to `tokens` tokens.

    `grad_in`: activation gradients are needed (the module or something before it trains);
    never for a convolution (a patch embedding reads pixels). A trained part's first matmul is
    counted with them too: an upper bound when it reads inputs that need no gradient.
    """
    flops = 0.0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            flops += _weight_flops(m.weight, tokens, grad_in and isinstance(m, nn.Linear))
    return flops


def attention_flops(
    rows: int, q_len: int, kv_len: int, width: int, grad_q: bool, grad_kv: bool
) -> float:
    """Scores and weighted values of `rows` attention rows, forward + the backward needed.

    Forward 4·d·Lq·Lkv (QKᵀ and PV); backward 2·d·Lq·Lkv each for dP (if anything needs a
    gradient), dQ (if the queries do), dK and dV (if keys and values do).
    """
    units = 2 + (grad_q or grad_kv) + grad_q + 2 * grad_kv
    return units * 2 * width * q_len * kv_len * rows


def step_flops(
    parts: dict[str, nn.Module],
    batch: Batch,
    vision_tokens: tuple[int, int],
    llm_shape: tuple[int, int],
    vision_shape: tuple[int, int] = (0, 0),
    head_tokens: int | None = None,
) -> float:
    """Training FLOPs of one batch over vision tower, connector and LLM (forward + backward).

    `vision_tokens` is (tokens the encoder runs on, tokens it hands the connector) per image;
    `llm_shape` and `vision_shape` are (layers, width), for the attention term; `head_tokens`
    the positions the LLM's vocabulary projection runs at (None: every token).
    """
    n_images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    order = [
        ("vision", n_images * vision_tokens[0]),
        ("connector", n_images * vision_tokens[1]),
        ("llm", batch.num_tokens),
    ]
    flops, upstream = 0.0, False
    for name, n_tokens in order:
        if name in parts:
            upstream = upstream or trains(parts[name])
            flops += matmul_flops(parts[name], n_tokens, upstream)
    if "llm" in parts:
        flops -= _skipped_head(parts["llm"], batch.num_tokens, head_tokens, upstream)
    flops += _llm_attention(batch, llm_shape, grad_from=0 if upstream else None)
    v_layers, v_width = vision_shape
    grad = "vision" in parts and trains(parts["vision"])
    flops += v_layers * attention_flops(
        n_images, vision_tokens[0], vision_tokens[0], v_width, grad, grad
    )
    return flops


def _skipped_head(llm: nn.Module, tokens: int, head_tokens: int | None, grad_in: bool) -> float:
    """FLOPs of the vocabulary projection at the `tokens - head_tokens` positions it skips."""
    head = llm.get_output_embeddings()
    if head_tokens is None or not isinstance(head, nn.Linear):
        return 0.0
    return _weight_flops(head.weight, tokens - head_tokens, grad_in)


def _llm_attention(batch: Batch, llm_shape: tuple[int, int], grad_from: int | None) -> float:
    """The LLM's causal self-attention per sample (the full square, as eager attention computes
    it); backward from decoder layer `grad_from` on (None: none)."""
    rows: Sequence[Sequence[int]] = batch.seq_lens or [[int(m.sum())] for m in batch.attention_mask]
    layers, width = llm_shape
    forward = 4 * width * sum(k * k for row in rows for k in row if k > 1)
    backward = 0 if grad_from is None else layers - grad_from
    return forward * layers + 2 * forward * backward


def qformer_flops(
    qformer: nn.Module, images: int, memory: int, grad_queries: bool, grad_memory: bool
) -> float:
    """One pass of a BLIP-2 Q-Former (`lmm.components.qformer.QFormer`) over `images` images.

    Its Q queries run through self-attention, the query side of cross-attention and the FFN;
    the cross-attention keys and values are projections of the `memory` vision tokens.
    `grad_queries`: the query stream needs gradients (something before or in it trains);
    `grad_memory`: the vision features need them (the vision tower trains).
    """
    queries = qformer.num_queries
    flops = 0.0
    grad_kv = grad_memory
    for name, m in qformer.named_modules():
        if isinstance(m, nn.Linear):
            on_memory = name.endswith(_MEMORY_SIDE)
            tokens = images * (memory if on_memory else queries)
            flops += _weight_flops(m.weight, tokens, grad_memory if on_memory else grad_queries)
            grad_kv = grad_kv or (on_memory and m.weight.requires_grad)
    config = qformer.model.config
    width, layers = config.hidden_size, config.num_hidden_layers
    cross = len(range(0, layers, config.cross_attention_frequency))
    flops += layers * attention_flops(images, queries, queries, width, grad_queries, grad_queries)
    flops += cross * attention_flops(images, queries, memory, width, grad_queries, grad_kv)
    return flops


def qformer_step_flops(
    parts: dict[str, nn.Module],
    batch: Batch,
    vision_tokens: int,
    llm_shape: tuple[int, int],
    vision_shape: tuple[int, int] = (0, 0),
    update_layer: int | None = None,
    head_tokens: int | None = None,
) -> float:
    """Training FLOPs of one batch of the Q-Former family (BLIP-2; Cheetah's VPG-C).

    Per image: the vision tower on `vision_tokens` tokens (BLIP-2: CLS + patches), the Q-Former
    (`qformer_flops`), the projection on its Q outputs. The LLM on the batch's tokens. With a
    `vpgc` part, per image at decoder layer `update_layer`: `qformer_proj` on one token, the
    Q-Former again, `llm_proj` on Q tokens; when nothing before VPG-C trains (Cheetah), the
    LLM's backward stops at `update_layer`. `llm_shape`, `vision_shape`: (layers, width);
    `head_tokens`: as in `step_flops`.
    """
    n = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    vision, qformer, connector, llm = (parts[k] for k in ("vision", "qformer", "connector", "llm"))
    vpgc = parts.get("vpgc")
    queries = qformer.num_queries
    t_vision, t_qformer, t_connector, t_llm = map(trains, (vision, qformer, connector, llm))
    t_vpgc = vpgc is not None and trains(vpgc)
    flops = matmul_flops(vision, n * vision_tokens, t_vision)
    v_layers, v_width = vision_shape
    flops += v_layers * attention_flops(n, vision_tokens, vision_tokens, v_width, *[t_vision] * 2)
    flops += qformer_flops(qformer, n, vision_tokens, t_vision or t_qformer, t_vision)
    into_llm = t_vision or t_qformer or t_connector  # the image tokens need gradients
    flops += matmul_flops(connector, n * queries, into_llm)
    grad_hidden = into_llm or t_llm  # every decoder layer's input needs gradients
    branch = vpgc is not None and n > 0 and (t_vpgc or t_vision or t_qformer or grad_hidden)
    layers, _ = llm_shape
    if grad_hidden:
        grad_from: int | None = 0
    elif branch:
        grad_from = layers // 2 if update_layer is None else update_layer
    else:
        grad_from = None
    flops += _llm_matmuls(llm, batch.num_tokens, grad_from)
    flops -= _skipped_head(llm, batch.num_tokens, head_tokens, grad_from is not None)
    flops += _llm_attention(batch, llm_shape, grad_from)
    if vpgc is not None and n > 0:
        flops += _weight_flops(vpgc.qformer_proj.weight, n, grad_hidden)
        flops += qformer_flops(qformer, n, vision_tokens, branch, t_vision)
        flops += _weight_flops(vpgc.llm_proj.weight, n * queries, branch)
    return flops


def _llm_matmuls(llm: nn.Module, tokens: int, grad_from: int | None) -> float:
    """The LLM's matmuls on `tokens` tokens; activation gradients from decoder layer `grad_from`."""
    flops = matmul_flops(llm, tokens, grad_from is not None)
    if grad_from:  # the layers before it run forward only (their weights are frozen then)
        for layer in layer_list(llm)[:grad_from]:
            flops -= matmul_flops(layer, tokens, True) - matmul_flops(layer, tokens, False)
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
        vpgc = "vpgc" in module.parts()  # Cheetah's VPG-C runs at this decoder layer
        self._update_layer = getattr(module.root_module(), "update_layer", None) if vpgc else None

    def batch_flops(self, module, batch: Batch) -> float:
        """Training FLOPs of `batch`: `qformer_step_flops` for a module with a Q-Former part."""
        parts = module.parts()
        head = module.logit_positions(batch)
        if "qformer" in parts:
            return qformer_step_flops(
                parts,
                batch,
                self._vision_tokens[0],
                self._llm,
                self._vision,
                self._update_layer,
                head_tokens=head,
            )
        return step_flops(
            parts, batch, self._vision_tokens, self._llm, self._vision, head_tokens=head
        )

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
