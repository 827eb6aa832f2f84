"""Batched generation with a KV cache from prefilled embeddings (media encoded once, at prefill)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel


@torch.no_grad()
def generate_tokens(
    llm: PreTrainedModel,
    inputs_embeds: Tensor,  # [B, L, D], left-padded prompts with media already scattered in
    attention_mask: Tensor,  # [B, L]
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Greedy (temperature 0) or nucleus sampling; each row stops at its first stop token.

    Returns the new tokens of each row, without the stop token.
    """
    batch = inputs_embeds.shape[0]
    mask = attention_mask.clone()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = llm(
        inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True
    )
    past, last_pos = out.past_key_values, positions[:, -1:]
    stops = torch.tensor(sorted(set(stop_token_ids)), device=inputs_embeds.device)
    done = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
    result: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(max_new_tokens):
        token = _pick(out.logits[:, -1].float(), temperature, top_p, generator)  # [B]
        for b in (~done).nonzero().flatten().tolist():
            if token[b] in stops:
                done[b] = True
            else:
                result[b].append(int(token[b]))
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        last_pos = last_pos + 1
        out = llm(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=last_pos,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
    return result


def _pick(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the first stop string, if any."""
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
