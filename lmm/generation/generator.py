"""Answers of a family model for prompt batches: what training, eval, chat and the API share."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmm.data.batch import Batch
from lmm.generation.decode import Step, StopFn, cut_at_stop, kernels, stream_tokens


class Generator:
    """Decodes prompt batches of a family model (`lmm.families.model.FamilyModel`).

    The media of a batch are encoded in one forward and the prompts prefilled together
    (`model.prefill`), with kernels that make each row's answer independent of the batch. A row
    ends at eos, at a stop string (`stop_strings`, else the batch's: its template's) or after
    `max_new_tokens` (the batch's, e.g. a benchmark's, else the generator's).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        max_new_tokens: int = 32,
        stop_strings: Sequence[str] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.max_new_tokens = max_new_tokens
        self.stop_strings = None if stop_strings is None else list(stop_strings)

    def stops(self, batch: Batch) -> list[str]:
        """The stop strings of a batch: the generator's own if set, else the batch's template's."""
        return list(self.stop_strings if self.stop_strings is not None else batch.stop_strings)

    def stream(
        self,
        batch: Batch,
        max_new_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        stop: StopFn | None = None,
        use_cache: bool = True,
        batch_invariant: bool = True,
    ) -> Iterator[Step]:
        """Decoding steps for a left-padded prompt batch (`lmm.generation.decode.stream_tokens`).

        With `seed`, row `i` samples from a generator seeded by (seed, sample id): the same
        answer at any batch size and in any order; a list gives each row its own seed (a
        server's requests). `stop(row, answer_tokens)` ends a row early besides the stop
        strings (a request's own `max_tokens` or stop strings).
        """
        with kernels(batch_invariant):
            prefill = self.model.prefill(batch, self.image_token_id)
        stops = self.stops(batch)
        seeds = None
        if seed is not None:
            row_seeds = [seed] * len(batch) if isinstance(seed, int) else list(seed)
            seeds = [
                zlib.crc32(f"{s}:{sid}".encode())
                for s, sid in zip(row_seeds, batch.ids, strict=True)
            ]

        def hit_stop_string(row: int, tokens: list[int]) -> bool:
            if stop is not None and stop(row, tokens):
                return True
            if not stops:
                return False
            tail = self.tokenizer.decode(tokens[-16:], skip_special_tokens=False)
            return any(s and s in tail for s in stops)

        return stream_tokens(
            self.model.llm.model,
            prefill,
            max_new_tokens=max_new_tokens or batch.max_new_tokens or self.max_new_tokens,
            stop_token_ids=self.stop_token_ids(stops),
            stop=hit_stop_string if stops or stop is not None else None,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
            use_cache=use_cache,
            batch_invariant=batch_invariant,
        )

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int | None = None, **sampling) -> list[str]:
        """Answers for a prompt batch: greedy unless `temperature` > 0 (see `stream`)."""
        answers: list[list[int]] = [[] for _ in range(len(batch))]
        for step in self.stream(batch, max_new_tokens, **sampling):
            for row, token in zip(step.rows, step.tokens, strict=True):
                if token is not None:
                    answers[row].append(token)
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=False)
        stops = self.stops(batch)
        return [cut_at_stop(t, stops) for t in texts]

    def stop_token_ids(self, stops: Sequence[str]) -> list[int]:
        """eos plus every stop string that is a single token of the tokenizer."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        vocab = self.tokenizer.get_vocab()
        return ids + [vocab[s] for s in stops if s in vocab]
