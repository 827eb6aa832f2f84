"""Choose the attention kernel, and `sdpa_packed`: sdpa that attends within each packed sample only.

`block_causal` is the block-diagonal causal mask of packed rows, for `sdpa_packed`'s short rows
and (from `Batch.seq_lens`, `lmm.data.packing.block_causal_mask`) for sdpa and eager.

flash-attn 2 on CUDA when installed; otherwise causal LMs get `sdpa_packed` and encoders `sdpa`
(eager when a model has no sdpa).

`sdpa_packed` is transformers' sdpa for everything but one case: a forward with no attention
mask whose position ids restart inside a row (lmm's packed rows; transformers' flash-attn 2
reads packed rows the same way). There, each sample is attended on its own with a causal
kernel, instead of the whole row under a block-diagonal mask: a row of n samples costs
sum(len_i^2) rather than (sum len_i)^2 query-key pairs, and the CPU kernel runs unmasked.
Rows shorter than `PER_SAMPLE_MIN_LENGTH` get the block-diagonal mask, built once per forward.

In bf16 on the CPU, samples (and short rows) up to `MATMUL_MAX_LENGTH` tokens are attended by
`matmul_attention`: two matmuls around a float32 softmax with the backward written out, 2-3x
faster forward + backward than torch's CPU flash kernel at these lengths (its scores stay in
cache). Longer samples, float32 and other devices keep the sdpa kernel. A long row whose samples
all take it is attended in one autograd function (`_GroupedAttention`): q, k, v cast once per
row, samples of similar length padded into groups whose float32 scores still fit in cache
(`GROUP_PADDING`, `GROUP_SCORES`), one batched matmul pair per group instead of per sample.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lmm.utils.logging import get_logger

log = get_logger(__name__)
_logged: set[str] = set()

PACKED_SDPA = "sdpa_packed"
# sdpa for a vision tower, its short bf16 CPU sequences as two matmuls (`short_sdpa_attention`)
SHORT_SDPA = "sdpa_short"
# Rows shorter than this take sdpa under a block-diagonal mask instead: at a few hundred
# tokens the per-sample calls cost more than the cross-sample pairs they skip (measured on
# the CPU: 256-token rows of 3-5 samples ~15% slower per sample, 1024-token rows ~20% faster).
PER_SAMPLE_MIN_LENGTH = 512
# Samples up to this length take `matmul_attention` in bf16 on the CPU (forward + backward,
# 10 heads of 64, vs torch's flash kernel: 128 tokens 3.3x, 290 2.5x, 450 1.8x faster, 600 0.8x).
MATMUL_MAX_LENGTH = 512


def resolve_attention(requested: str = "auto", causal_lm: bool = False, short: bool = False) -> str:
    """Return the `attn_implementation` to pass to transformers for `requested`.

    `auto` picks `flash_attention_2` when CUDA is available and `flash_attn` imports, else
    `sdpa_packed` for a causal LM (`causal_lm`), `sdpa_short` for a model of short unmasked
    sequences on a machine without CUDA (`short`: the vision towers), and `sdpa` for other
    models. An explicit `flash_attention_2` without CUDA or the package falls back the same
    way, with a warning.
    """
    cuda = torch.cuda.is_available()
    has_flash = cuda and importlib.util.find_spec("flash_attn") is not None
    fallback = PACKED_SDPA if causal_lm else SHORT_SDPA if short and not cuda else "sdpa"
    if requested == "auto":
        choice = "flash_attention_2" if has_flash else fallback
    elif requested == "flash_attention_2" and not has_flash:
        log.warning(
            "flash_attention_2 needs CUDA and the flash-attn package; using %s instead", fallback
        )
        choice = fallback
    else:
        choice = requested
    if choice not in _logged:
        _logged.add(choice)
        log.info("attention implementation: %s", choice)
    return choice


def _starts(position_ids: Tensor, rows: int) -> Tensor:
    """`[B, L]` bool: where a sample starts (the positions stop counting up by one)."""
    pos = position_ids.expand(rows, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts


def segments(position_ids: Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) spans where positions count up by one: the packed samples."""
    starts = _starts(position_ids, rows)
    spans = []
    length = starts.shape[1]
    for row in starts.tolist():
        begin = [i for i, s in enumerate(row) if s]
        spans.append(list(zip(begin, begin[1:] + [length], strict=True)))
    return spans


# What the layers of one forward derive from its position ids (the same tensor reaches every
# layer, and the recomputation of activation checkpointing): computed once, for the last
# position ids seen.
_derived: dict = {"position_ids": None}


def _once(position_ids: Tensor, key: tuple, build):
    if _derived["position_ids"] is not position_ids:
        _derived.clear()
        _derived["position_ids"] = position_ids
    if key not in _derived:
        _derived[key] = build()
    return _derived[key]


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: Tensor,  # [B, H, L, D]
    key: Tensor,  # [B, H_kv, L, D]
    value: Tensor,  # [B, H_kv, L, D]
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """sdpa; with no mask, causal attention within each span of counting-up position ids."""
    position_ids = kwargs.get("position_ids")
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    length = query.shape[2]
    if (
        attention_mask is not None
        or position_ids is None
        or not is_causal
        or length != key.shape[2]
        or length == 1
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    window = kwargs.get("sliding_window")
    if length < PER_SAMPLE_MIN_LENGTH:
        rows = query.shape[0]
        mask = _once(
            position_ids,
            ("mask", rows, window),
            lambda: block_causal(_starts(position_ids, rows).cumsum(1), window),
        )
        if _use_matmul(query, length, dropout):
            bias = _once(position_ids, ("bias", rows, window), lambda: additive_bias(mask))
            out = matmul_attention(query, key, value, bias, scaling)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if GROUP_SAMPLES and _use_matmul(query, 0, dropout) and window is None:
        plans = _once(
            position_ids,
            ("groups", query.shape[0]),
            lambda: [
                _group_plan(spans, query.shape[1], query.device)
                for spans in segments(position_ids, query.shape[0])
            ],
        )
        if all(plan.longest <= MATMUL_MAX_LENGTH for plan in plans):
            return _grouped_rows(query, key, value, plans, scaling), None
    groups = query.shape[1] // key.shape[1]
    rows = []
    # unbind + split (not indexing): their backward is one stack / cat, not a zero-filled
    # full-size gradient per slice.
    for spans, q, k, v in zip(
        _once(
            position_ids, ("spans", query.shape[0]), lambda: segments(position_ids, query.shape[0])
        ),
        query.unbind(0),
        key.unbind(0),
        value.unbind(0),
        strict=True,
    ):
        merged = _merge_singletons(spans)
        sizes = [end - start for start, end, _ in merged]
        pieces = []
        for (_, _, alone), qs, ks, vs in zip(
            merged, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), strict=True
        ):
            if alone:  # one-token samples (pads): each attends to itself, its output is v
                pieces.append(vs.repeat_interleave(groups, dim=0) if groups > 1 else vs)
            else:
                pieces.append(_causal(qs[None], ks[None], vs[None], dropout, scaling, window)[0])
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    out = torch.stack(rows)  # [B, H, L, D]
    return out.transpose(1, 2).contiguous(), None


# Long rows in bf16 on the CPU: samples attended in padded groups (`GroupPlan`); False: one
# `matmul_attention` call per sample, as before the eighth session (kept for comparison).
GROUP_SAMPLES = True
# Samples of a row padded to a common length are attended together while the padded
# query-key pairs stay within this share over the samples' own (sum of len²).
GROUP_PADDING = 0.25
# ... and while a group's scores (heads x samples x length²) stay within this many elements:
# float32 scores that stay in cache (one sample of ~320 tokens at 10 heads) keep the softmax
# and its casts at cache speed.
GROUP_SCORES = 1 << 20


class GroupPlan:
    """How one packed row is attended in padded groups of samples. Per group `(index, size,
    bias)`: `index` `[samples * size]` the row position of each padded slot (sample by sample;
    padding repeats the sample's first position), `bias` `[samples, size, size]` float32,
    causal within a sample with -inf on padded keys (padded queries see their sample's first
    key). `inverse` `[L]`: each position's slot in the groups' concatenation; `pad` per group,
    `[samples * size]` bool."""

    def __init__(self, groups, inverse, pad):
        self.groups, self.inverse, self.pad = groups, inverse, pad
        self.longest = max((size for _, size, _ in groups), default=0)


def _group_plan(spans: list[tuple[int, int]], heads: int, device: torch.device) -> GroupPlan:
    """Group a row's samples (spans) by length, longest first: a group takes the next sample
    while its padded pairs stay within `GROUP_PADDING` of the samples' own and its scores
    within `GROUP_SCORES` elements."""
    order = sorted(spans, key=lambda span: span[0] - span[1])  # longest first, stable
    groups: list[list[tuple[int, int]]] = []
    own = 0
    for span in order:
        n = span[1] - span[0]
        if groups:
            top = groups[-1][0][1] - groups[-1][0][0]
            count = len(groups[-1]) + 1
            if (
                count * top * top <= (1 + GROUP_PADDING) * (own + n * n)
                and heads * count * top * top <= GROUP_SCORES
            ):
                groups[-1].append(span)
                own += n * n
                continue
        groups.append([span])
        own = n * n
    out, pads = [], []
    inverse = [0] * (spans[-1][1] if spans else 0)
    slots = 0
    for group in groups:
        size = group[0][1] - group[0][0]
        index, pad, lengths = [], [], []
        for start, end in group:
            for i in range(start, end):
                inverse[i] = slots + len(index) + i - start
            index.extend(range(start, end))
            index.extend([start] * (size - (end - start)))
            pad.extend([False] * (end - start) + [True] * (size - (end - start)))
            lengths.append(end - start)
        slots += len(index)
        n = torch.tensor(lengths, device=device)
        i = torch.arange(size, device=device)
        allowed = (i[None, :, None] >= i[None, None, :]) & (i[None, None, :] < n[:, None, None])
        allowed[:, :, 0] = True  # padded queries (i >= n) keep one key: no empty softmax
        out.append((torch.tensor(index, device=device), size, additive_bias(allowed)))
        pads.append(torch.tensor(pad, device=device))
    return GroupPlan(out, torch.tensor(inverse, device=device), pads)


class _GroupedAttention(torch.autograd.Function):
    """`matmul_attention` of one packed row `[H, L, D]` (heads equal for q, k, v), its samples
    gathered into padded groups (`GroupPlan`), each group one contiguous `[H, samples, size,
    D]` batch: a few batched matmuls per row instead of a pair per sample, and no copies
    inside them. Outputs and gradients are gathered back by position (`inverse`); gradients
    of padded slots are zero by construction (their outputs are never read)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: GroupPlan, scale: float) -> Tensor:
        heads, dim = q.shape[0], q.shape[-1]
        outs, saved = [], []
        for index, size, bias in plan.groups:
            shape = (heads, index.numel() // size, size, dim)
            qg, kg, vg = (t.index_select(1, index).view(shape) for t in (q, k, v))
            scores = torch.matmul(qg, kg.transpose(-1, -2)).float().mul_(scale).add_(bias)
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = torch.matmul(probs, vg)
            outs.append(out.view(heads, -1, dim))
            saved += [qg, kg, vg, probs, out]
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.scale = plan, scale
        return out.index_select(1, plan.inverse)

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved, plan = ctx.saved_tensors, ctx.plan
        grad = grad.to(saved[0].dtype)
        grads = ([], [], [])
        for g, ((index, _, _), pad) in enumerate(zip(plan.groups, plan.pad, strict=True)):
            qg, kg, vg, probs, out = saved[5 * g : 5 * g + 5]
            gg = grad.index_select(1, index).view(qg.shape)
            gg.masked_fill_(pad.view(1, *qg.shape[1:3], 1), 0)
            delta = (gg.float() * out.float()).sum(-1, keepdim=True)
            grad_v = torch.matmul(probs.transpose(-1, -2), gg)
            grad_scores = torch.matmul(gg, vg.transpose(-1, -2)).float()
            grad_scores = grad_scores.sub_(delta).mul_(probs.float()).to(qg.dtype)
            grad_q = torch.matmul(grad_scores, kg).mul_(ctx.scale)
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), qg).mul_(ctx.scale)
            for acc, t in zip(grads, (grad_q, grad_k, grad_v), strict=True):
                acc.append(t.view(qg.shape[0], -1, qg.shape[-1]))
        return (
            *(
                (torch.cat(g, dim=1) if len(g) > 1 else g[0]).index_select(1, plan.inverse)
                for g in grads
            ),
            None,
            None,
        )


def _grouped_rows(q: Tensor, k: Tensor, v: Tensor, plans: list[GroupPlan], scale) -> Tensor:
    """Packed rows `[B, H, L, D]` attended in padded groups of samples, returned `[B, L, H, D]`."""
    dtype = compute_dtype(q)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        rows = [
            _GroupedAttention.apply(*row, plan, scale)
            for *row, plan in zip(q.unbind(0), k.unbind(0), v.unbind(0), plans, strict=True)
        ]
    return torch.stack(rows).transpose(1, 2).contiguous()


class _MatmulAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) v with a float32 softmax; the backward reuses the saved
    probabilities (flash attention's dS = P ∘ (dP − rowsum(dO ∘ O)))."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).add_(bias)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, probs, out = ctx.saved_tensors
        grad = grad.to(q.dtype)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad)
        grad_probs = torch.matmul(grad, v.transpose(-1, -2)).float()
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)
        grad_scores = grad_probs.sub_(delta).mul_(probs.float()).to(q.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None


def matmul_attention(
    q: Tensor,  # [..., H, n, D]
    k: Tensor,  # [..., H_kv, n, D]
    v: Tensor,  # [..., H_kv, n, D]
    bias: Tensor,  # float32, broadcastable to [..., H, n, n]: 0 where a query sees a key, else -inf
    scale: float | None = None,
) -> Tensor:  # [..., H, n, D]
    """Attention as two matmuls and a float32 softmax (sdpa's result up to rounding), in the
    compute dtype (`compute_dtype`: autocast's, as sdpa under autocast); key / value heads are
    repeated for grouped queries. Every query must see at least one key (`additive_bias`)."""
    dtype = compute_dtype(q)
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        return _MatmulAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), bias, scale)


def additive_bias(allowed: Tensor) -> Tensor:
    """The float32 bias of a boolean mask: 0 where `allowed`, -inf elsewhere."""
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))


def compute_dtype(q: Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on (rotary embeddings hand the
    kernel float32 queries and keys under bf16 autocast), else the queries'."""
    device = q.device.type
    if q.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return q.dtype


def _use_matmul(q: Tensor, n: int, dropout: float) -> bool:
    """`matmul_attention` beats the sdpa kernel here: bf16 on the CPU, short, no dropout."""
    return (
        q.device.type == "cpu"
        and compute_dtype(q) == torch.bfloat16
        and n <= MATMUL_MAX_LENGTH
        and dropout == 0.0
    )


@lru_cache(maxsize=64)
def _causal_allowed(n: int, window: int | None, device: torch.device) -> Tensor:
    """`[n, n]` bool: causal (within `window`, if given)."""
    i = torch.arange(n, device=device)
    offset = i[:, None] - i[None, :]
    return (offset >= 0) & (offset < window) if window is not None else offset >= 0


@lru_cache(maxsize=64)
def _causal_bias(n: int, window: int | None, device: torch.device) -> Tensor:
    """`additive_bias` of `_causal_allowed` (kept: every layer and sample of that length)."""
    return additive_bias(_causal_allowed(n, window, device))


def _merge_singletons(spans: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """Spans with each run of one-token spans merged into one, flagged `alone`."""
    out: list[tuple[int, int, bool]] = []
    for start, end in spans:
        alone = end - start == 1
        if alone and out and out[-1][2]:
            out[-1] = (out[-1][0], end, True)
        else:
            out.append((start, end, alone))
    return out


def block_causal(sample: Tensor, window: int | None = None) -> Tensor:
    """`[B, 1, L, L]` bool, True where a query may attend a key: causal within each sample
    (and within `window`, if given). `sample` `[B, L]` numbers the sample of each position."""
    causal = _causal_allowed(sample.shape[1], window, sample.device)
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]


def _causal(
    q: Tensor,  # [G, H, n, D]
    k: Tensor,  # [G, H_kv, n, D]
    v: Tensor,  # [G, H_kv, n, D]
    dropout: float,
    scaling: float | None,
    window: int | None,
) -> Tensor:  # [G, H, n, D]
    """Causal sdpa over samples (within a sliding window if the layer has one)."""
    n = q.shape[2]
    if _use_matmul(q, n, dropout):
        return matmul_attention(q, k, v, _causal_bias(n, window, q.device), scaling)
    mask = _causal_allowed(n, window, q.device) if window is not None and n > window else None
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=mask is None,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def packed_sdpa_mask(*args, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """transformers' sdpa mask, but none for a mask-free prefill: the attention finds the samples.

    Masks combined with extra mask functions (`use_vmap`, e.g. bidirectional image spans) are
    built as sdpa builds them.
    """
    q_length = kwargs.get("q_length", args[1] if len(args) > 1 else None)
    kv_length = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
    if attention_mask is None and q_length == kv_length and not kwargs.get("use_vmap"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def short_sdpa_attention(
    module: torch.nn.Module,
    query: Tensor,  # [B, H, L, D]
    key: Tensor,  # [B, H_kv, S, D]
    value: Tensor,  # [B, H_kv, S, D]
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """sdpa; unmasked, non-causal attention in bf16 on the CPU over at most `MATMUL_MAX_LENGTH`
    keys takes `matmul_attention` instead: a vision tower's 17-145 patches run forward and
    backward 1.4-4x faster than in torch's CPU flash kernel (docs/benchmarks.md). Anything else
    (a mask, causal, softcapping, dropout, another device or dtype) is sdpa's."""
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if (
        attention_mask is not None
        or is_causal
        or kwargs.get("softcap") is not None
        or not _use_matmul(query, key.shape[2], dropout)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    bias = torch.zeros((), dtype=torch.float32, device=query.device)  # every key seen
    out = matmul_attention(query, key, value, bias, scaling)
    return out.transpose(1, 2).contiguous(), None


# Never traced by dynamo (compiled layers, lmm.components.compiled): its split of the rows by
# position ids runs on the host, a recompilation for every packing if it were traced.
AttentionInterface.register(PACKED_SDPA, torch.compiler.disable(packed_sdpa_attention))
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
AttentionInterface.register(SHORT_SDPA, short_sdpa_attention)
AttentionMaskInterface.register(SHORT_SDPA, sdpa_mask)  # masks as sdpa gets them (then sdpa)
