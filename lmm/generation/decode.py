"""Batched generation with a KV cache whose answers do not depend on the batch.

`stream_tokens` prefills a left-padded batch of prompt embeddings once (media already scattered
in, so they are encoded once), with explicit position ids, then decodes all rows together from
the KV cache; finished rows leave the batch. Greedy answers at bs=1 equal those at bs=64 bit for
bit, because inside `RowInvariant` every reduction a row goes through has shapes that depend on
that row only:

- A BLAS GEMM rounds a row differently depending on how many rows it multiplies (MKL: a lone
  row is a GEMV, rows in 4-row tiles take another path). Under `RowInvariant(chunk)` every
  `F.linear` on `[..., L, K]` is a batch of fixed-shape `[chunk, K] @ [K, N]` products over
  chunks of each row's positions aligned to the row's *end* (left-padded with zeros to a whole
  number of chunks), so a token meets the same product at the same place whatever the row's
  left padding or the batch size. Prefill uses `chunk=PREFILL_CHUNK`, decoding `chunk=1`.
- A masked softmax over a left-padded row sums in another order than over the unpadded row.
  `F.scaled_dot_product_attention` becomes `row_attention`: one sdpa call per row on that row's
  own keys (from its first real token), exactly the call the row alone makes; pad queries get
  zeros, not NaN, so pad positions never poison the cache.
- Norms, activations and rotary embeddings work per position and are unaffected.

Sampling (temperature, top-p) draws each row from its own generator when per-row seeds are
given, so a sampled answer depends on its seed, not on its batch neighbours.

Only what runs through `F.linear` and sdpa is covered: eager attention, 4-bit layers or models
that fold the batch into the position axis decode correctly but without the bit-level guarantee.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache, PreTrainedModel

StopFn = Callable[[int, list[int]], bool]
PREFILL_CHUNK = 16  # positions per fixed-shape product at prefill (and media encoding)


class RowInvariant(TorchFunctionMode):
    """Within this mode, `F.linear` and sdpa compute each batch row as if it were alone."""

    def __init__(self, chunk: int = PREFILL_CHUNK):
        """
        Args:
            chunk: positions per fixed-shape product (1 = one position at a time, for decoding).
        """
        super().__init__()
        self.chunk = chunk

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return row_linear(*args, **kwargs, chunk=self.chunk)
        if func is F.scaled_dot_product_attention:
            return row_attention(*args, **kwargs)
        return func(*args, **kwargs)


def row_linear(
    input: Tensor,  # [..., L, K]: L positions of a row (a 2-D input is one position per row)
    weight: Tensor,  # [N, K]
    bias: Tensor | None = None,  # [N]
    chunk: int = 1,
) -> Tensor:  # [..., L, N]
    """`F.linear` as fixed-shape `[chunk, K] @ [K, N]` products over end-aligned position chunks."""
    k, n = input.shape[-1], weight.shape[0]
    if chunk == 1 or input.dim() < 3:
        x = input.reshape(-1, 1, k)  # [M, 1, K]: one product per position
        out = torch.bmm(x, weight.t().unsqueeze(0).expand(x.shape[0], -1, -1))
        out = out.reshape(*input.shape[:-1], n)
    else:
        length = input.shape[-2]
        pad = (-length) % chunk
        x = F.pad(input.reshape(-1, length, k), (0, 0, pad, 0))  # [R, pad + L, K]
        x = x.reshape(-1, chunk, k)  # [R * n_chunks, chunk, K]
        out = torch.bmm(x, weight.t().unsqueeze(0).expand(x.shape[0], -1, -1))
        out = out.reshape(-1, pad + length, n)[:, pad:].reshape(*input.shape[:-1], n)
    return out if bias is None else out + bias


def row_attention(
    query: Tensor,  # [B, H, Q, d]
    key: Tensor,  # [B, H_kv, S, d]
    value: Tensor,  # [B, H_kv, S, d]
    attn_mask: Tensor | None = None,  # [B or 1, 1, Q or 1, S] bool, True = attend
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:  # [B, H, Q, d]
    """sdpa run row by row on each row's own keys, so no row sees the batch's padding.

    A left-padded row `b` attends its keys `start_b..S-1` with the same sdpa call, on the same
    shapes, as the row alone (queries of pad positions get zeros): decoding (one query per row)
    without a mask, prefill (Q = S) causal or full. Grouped-query attention is brought to one
    form first (packed query heads when decoding, repeated kv heads otherwise), since callers
    pass it differently with and without padding. Other masks run batched, as sdpa would.
    """
    batch, heads, n_q, d = query.shape
    kv_heads = key.shape[1]
    if heads != kv_heads:  # grouped-query attention: one canonical form whatever the caller did
        groups = heads // kv_heads
        if n_q == 1 and (attn_mask is None or attn_mask.shape[-2] == 1):
            # Decoding: each kv head's query heads as its queries, as transformers packs them.
            packed = query.reshape(batch, kv_heads, groups, d)
            out = row_attention(packed, key, value, attn_mask, dropout_p, is_causal, scale)
            return out.reshape(batch, heads, 1, d)
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    kwargs = dict(dropout_p=dropout_p, scale=scale)
    if attn_mask is None:
        layout = (torch.zeros(batch, dtype=torch.long), is_causal)
    else:
        layout = _row_layout(attn_mask, batch, n_q, key.shape[-2])
    if layout is None:  # not left padding + causal/full: no row-by-row form
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs
        )
    starts, causal = layout
    decoding = attn_mask is not None and attn_mask.shape[-2] == 1  # every query sees all keys
    out = query.new_zeros(query.shape)  # pad queries attend to nothing: zeros
    for b, start in enumerate(starts.tolist()):
        first = 0 if decoding else start
        q = query[b : b + 1, :, first:]
        k, v = key[b : b + 1, :, start:], value[b : b + 1, :, start:]
        out[b : b + 1, :, first:] = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and not decoding, **kwargs
        )
    return out


def _row_layout(mask: Tensor, batch: int, n_q: int, n_k: int) -> tuple[Tensor, bool] | None:
    """Each row's first real key and whether the mask is causal, if it is left padding + causal/full.

    None when the mask is anything else (per-head, additive, or holes inside a row).
    """
    if mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[-1] != n_k:
        return None
    keep = mask[:, 0].expand(batch, mask.shape[-2], n_k)  # [B, Q or 1, S]
    starts = n_k - keep[:, -1].sum(-1)  # the last query sees every real key
    columns = torch.arange(n_k, device=mask.device)
    real = columns[None, :] >= starts[:, None]  # [B, S]
    if keep.shape[1] == 1:  # decoding: one query (or packed heads) per row
        return (starts.cpu(), False) if bool((keep[:, 0] == real).all()) else None
    if n_q != n_k:
        return None
    rows_real = real[:, :, None] & real[:, None, :]  # [B, Q, S]: real query and real key
    causal = rows_real & (columns[None, :, None] >= columns[None, None, :])
    for is_causal, expected in ((True, causal), (False, rows_real)):
        # Pad queries may see anything (their output is discarded): compare real queries only.
        if bool(((keep == expected) | ~real[:, :, None]).all()):
            return starts.cpu(), is_causal
    return None


@dataclass
class Step:
    """One decoding step: the rows still generating, their logits and the tokens picked."""

    rows: list[int]  # original row indices, in the order of `logits`
    logits: Tensor  # [len(rows), V] float32 next-token logits
    tokens: list[int | None]  # the new answer token of each row; None = it picked a stop token
    finished: list[bool]  # the row ended at this step (stop token, stop condition or length)


@dataclass
class Prefill:
    """What a family model hands the generator for a left-padded prompt batch.

    `position_ids` are the prompt's positions when the family computes its own (M-RoPE's
    `[3, B, L]`); decoding continues each row at its last position + 1 (on every axis). None:
    counted from the mask. `context(rows)`, if given, is entered around every LLM pass over whole
    prompts (the prefill; with `use_cache=False` every step), with the batch rows that pass runs:
    Cheetah's VPG-C applies its residual inside the LLM there.
    """

    embeds: Tensor  # [B, L, D] prompts with the media scattered in
    attention_mask: Tensor  # [B, L], 1 = real token
    position_ids: Tensor | None = None  # [B, L] or [k, B, L]
    context: Callable[[list[int]], contextlib.AbstractContextManager] | None = None


@torch.no_grad()
def stream_tokens(
    llm: PreTrainedModel,
    prefill: Prefill,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    stop: StopFn | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    batch_invariant: bool = True,
) -> Iterator[Step]:
    """Yield one `Step` per new token position until every row has finished.

    Greedy when `temperature` is 0, else nucleus sampling (`top_p`). With `seeds` (one per row)
    each row samples from its own generator; otherwise from `generator` (or torch's global RNG).
    A row ends at a stop token (not part of its answer), when `stop(row, answer_tokens)` says
    so (the token is kept; cut the text afterwards), or after `max_new_tokens`.
    `use_cache=False` recomputes every prompt + answer from scratch at each step (for tests);
    `batch_invariant=False` uses the model's own kernels (faster, not bit-exact across batches).
    """
    n = prefill.embeds.shape[0]
    if n == 0 or max_new_tokens <= 0:
        return
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; give one seed per prompt")
    device = prefill.embeds.device
    generators: list[torch.Generator | None] = [generator] * n
    if seeds is not None:
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    stops = {int(t) for t in stop_token_ids}
    answers: list[list[int]] = [[] for _ in range(n)]
    decoder = (_CachedDecoder if use_cache else _Recompute)(llm, prefill, batch_invariant)
    logits = decoder.prefill()  # [n, V]
    active = list(range(n))
    for step in range(max_new_tokens):
        picked = _pick(logits, temperature, top_p, [generators[r] for r in active])
        tokens: list[int | None] = []
        finished: list[bool] = []
        for r, tok in zip(active, picked.tolist(), strict=True):
            if tok in stops:
                tokens.append(None)
                finished.append(True)
                continue
            answers[r].append(tok)
            tokens.append(tok)
            ended = step == max_new_tokens - 1 or (stop is not None and stop(r, answers[r]))
            finished.append(ended)
        yield Step(list(active), logits, tokens, finished)
        keep = [i for i, done in enumerate(finished) if not done]
        if not keep:
            return
        active = [active[i] for i in keep]
        next_tokens = torch.tensor([answers[r][-1] for r in active], device=device)
        logits = decoder.step(keep, next_tokens)


def kernels(batch_invariant: bool, chunk: int = PREFILL_CHUNK):
    """`RowInvariant(chunk)` when asked for, else a no-op context."""
    return RowInvariant(chunk) if batch_invariant else contextlib.nullcontext()


def _positions(mask: Tensor) -> Tensor:  # [B, L] -> [B, L]: 0.. from each row's first real token
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _Decoder:
    """The prompt batch's state: mask, positions, and the rows still generating."""

    def __init__(self, llm: PreTrainedModel, prefill: Prefill, batch_invariant: bool):
        self.llm = llm
        self.embeds = prefill.embeds
        self.mask = prefill.attention_mask.long()
        self.positions = prefill.position_ids
        if self.positions is None:
            self.positions = _positions(self.mask)
        self.context = prefill.context
        self.rows = list(range(self.mask.shape[0]))  # the prompt rows still in the batch
        self.exact = batch_invariant

    def whole_prompts(self, **kwargs):
        """An LLM pass over whole prompts (+ answers so far), inside the family's context."""
        context = self.context(self.rows) if self.context else contextlib.nullcontext()
        with context, kernels(self.exact):
            return self.llm(
                inputs_embeds=self.embeds,
                attention_mask=self.mask,
                position_ids=self.positions,
                logits_to_keep=1,
                **kwargs,
            )

    def keep(self, keep: list[int]) -> Tensor | None:
        """Drop finished rows (their index, None if none finished); one more mask column."""
        index = None
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.rows = [self.rows[i] for i in keep]
            self.mask = self.mask[index]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(keep), 1)], dim=1)
        return index


class _CachedDecoder(_Decoder):
    """Prefill the left-padded batch once, then decode all active rows from the KV cache."""

    def prefill(self) -> Tensor:
        # transformers' Cache object, passed and read as `cache` (the `past_key_values` name
        # is deprecated since 5.24)
        out = self.whole_prompts(cache=DynamicCache(config=self.llm.config), use_cache=True)
        self.cache = out.cache
        self.next_position = self.positions[..., -1] + 1  # [B] (or [k, B])
        return out.logits[:, -1].float()

    def step(self, keep: list[int], tokens: Tensor) -> Tensor:  # tokens [B_active] -> [B_active, V]
        index = self.keep(keep)
        if index is not None:  # finished rows leave the batch
            self.cache.batch_select_indices(index)
            self.next_position = self.next_position[..., index]
        with kernels(self.exact, chunk=1):
            out = self.llm(
                input_ids=tokens[:, None],
                attention_mask=self.mask,
                position_ids=self.next_position[..., None],
                cache=self.cache,
                use_cache=True,
            )
        self.cache = out.cache
        self.next_position = self.next_position + 1
        return out.logits[:, -1].float()


class _Recompute(_Decoder):
    """No cache: every step runs the prompts and their answers so far from scratch."""

    def prefill(self) -> Tensor:
        return self.whole_prompts(use_cache=False).logits[:, -1].float()

    def step(self, keep: list[int], tokens: Tensor) -> Tensor:
        index = self.keep(keep)
        if index is not None:
            self.embeds, self.positions = self.embeds[index], self.positions[..., index, :]
        new = self.llm.get_input_embeddings()(tokens)[:, None].to(self.embeds.dtype)  # [B, 1, D]
        self.embeds = torch.cat([self.embeds, new], dim=1)
        self.positions = torch.cat([self.positions, self.positions[..., -1:] + 1], dim=-1)
        return self.prefill()


def _pick(
    logits: Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator | None]
) -> Tensor:
    """Greedy (temperature <= 0) or nucleus sampling; rows with their own generator draw alone."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    if len(set(map(id, generators))) == 1:  # one shared generator (or torch's global RNG)
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(-1)
    draws = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    return torch.cat(draws)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the first stop string, if any."""
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
