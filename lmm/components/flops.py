"""FLOPs of a training step, counted analytically per batch, as PaLM's MFU does.

A matmul weight of N parameters costs 2·N FLOPs per token forward, and the backward pass 2·N
more for the activation gradients (if it or anything before it trains) plus 2·N for the weight
gradients (if it trains); attention adds 4·d·L² per layer and row forward (×3 with its
backward). A family model counts its parts apart, each with its own token count
(`FamilyModel.step_flops`); the throughput monitor divides by the step time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmm.data.batch import Batch


def layer_list(
    module: nn.Module, names: tuple[str, ...] = ("layers", "h", "blocks")
) -> nn.ModuleList:
    """The first `nn.ModuleList` named like a stack of transformer layers inside `module`."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.split(".")[-1] in names and len(child):
            return child
    raise ValueError(
        f"no transformer layer list ({', '.join(names)}) found in {type(module).__name__}"
    )


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


def weight_flops(weight: torch.Tensor, tokens: int, grad_in: bool) -> float:
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
            flops += weight_flops(m.weight, tokens, grad_in and isinstance(m, nn.Linear))
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


def _skipped_head(llm: nn.Module, tokens: int, head_tokens: int | None, grad_in: bool) -> float:
    """FLOPs of the vocabulary projection at the `tokens - head_tokens` positions it skips."""
    head = llm.get_output_embeddings()
    if head_tokens is None or not isinstance(head, nn.Linear):
        return 0.0
    return weight_flops(head.weight, tokens - head_tokens, grad_in)


def _llm_attention(batch: Batch, llm_shape: tuple[int, int], grad_from: int | None) -> float:
    """The LLM's causal self-attention per sample (the full square, as eager attention computes
    it); backward from decoder layer `grad_from` on (None: none)."""
    rows: Sequence[Sequence[int]] = batch.seq_lens or [[int(m.sum())] for m in batch.attention_mask]
    layers, width = llm_shape
    forward = 4 * width * sum(k * k for row in rows for k in row if k > 1)
    backward = 0 if grad_from is None else layers - grad_from
    return forward * layers + 2 * forward * backward


def llm_step_flops(
    llm: nn.Module, batch: Batch, grad_from: int | None, head_tokens: int | None
) -> float:
    """The causal LM (`lmm.components.language.CausalLM`) on the batch's tokens: its matmuls,
    minus the vocabulary projection where it is skipped (`head_tokens` positions computed;
    None: all), plus causal attention; backward from decoder layer `grad_from` (None: none)."""
    config = llm.model.config
    config = getattr(config, "text_config", None) or config
    flops = _llm_matmuls(llm, batch.num_tokens, grad_from)
    flops -= _skipped_head(llm, batch.num_tokens, head_tokens, grad_from is not None)
    shape = (config.num_hidden_layers, config.hidden_size)
    return flops + _llm_attention(batch, shape, grad_from)


def _llm_matmuls(llm: nn.Module, tokens: int, grad_from: int | None) -> float:
    """The LLM's matmuls on `tokens` tokens; activation gradients from decoder layer `grad_from`."""
    flops = matmul_flops(llm, tokens, grad_from is not None)
    if grad_from:  # the layers before it run forward only (their weights are frozen then)
        for layer in layer_list(llm)[:grad_from]:
            flops -= matmul_flops(layer, tokens, True) - matmul_flops(layer, tokens, False)
    return flops


def recomputed_flops(llm: nn.Module, batch: Batch) -> float:
    """The forward FLOPs activation checkpointing runs again in the backward (for HFU): every
    decoder layer's matmuls and attention when the causal LM checkpoints its layers (transformers'
    `gradient_checkpointing_enable`) and trains; 0 otherwise. An upper bound under a selective
    policy that saves some of a layer's outputs."""
    inner = getattr(llm, "model", llm)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x names it is_gradient_checkpointing
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if not (checkpointing and inner.training):
        return 0.0
    config = getattr(inner.config, "text_config", None) or inner.config
    layers = layer_list(inner)
    weights = sum(
        m.weight.numel() for m in layers.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    return 2 * batch.num_tokens * weights + _llm_attention(
        batch, (len(layers), config.hidden_size), None
    )
