"""Segment-by-segment tokenization: template segments → input_ids and labels masked per segment."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from lmm.data.templates import Segment

IGNORE_INDEX = -100


class SegmentTokenizer:
    r"""Tokenizes `Segment`s one by one so that their tokens equal those of the whole text.

    Tokenizing each segment alone must give the same ids as tokenizing `render_text(segments)`
    at once, or training would see other tokens than inference. Two things could differ:

    - A text that starts a string gets a prefix space from SentencePiece-style tokenizers
      (Mistral, Llama-2: `"red"` → `▁red`), one in the middle of a text does not. So every
      segment after the first is encoded behind an anchor, `encode(image_token + text)[1:]`:
      the image token is a special token, the tokenizer splits the string at it first and
      does not prefix the text after it, exactly as for text in the middle of the whole
      string. Byte-level BPE (Llama-3, GPT-2) never adds a prefix, so the anchor is harmless.
    - Merges across a boundary: templates only cut next to a special token or before a space
      (see `lmm.data.templates`), where BPE pre-tokenizers and SentencePiece pieces split too.
      One case stays tokenizer-dependent: a cut after a run of 2+ whitespace characters
      (Llama3's header ends in "\n\n"). Llama-3/Qwen2-style split regexes keep the run whole,
      as segments do; GPT-2's `\s+(?!\S)` splits its last character off before a word, so a
      GPT-2-regex vocabulary with a "\n\n" token differs there. Pair templates with the
      tokenizers they were made for.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token: str = "<image>"):
        """
        Args:
            tokenizer: The language model's tokenizer, with `image_token` added as a special token.
            image_token: The placeholder a media segment becomes (one token; the processor
                expands it to the family's number of media tokens).
        """
        self.tokenizer = tokenizer
        self.image_token = image_token
        ids = tokenizer(image_token, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no single token for {image_token!r} (it encodes to {ids}); "
                "add it as a special token before training: tokenizer.add_special_tokens("
                f"{{'additional_special_tokens': [{image_token!r}]}}) and resize the model's "
                "embeddings"
            )
        self.image_token_id: int = ids[0]

    def encode(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """input_ids and labels; each media segment becomes ONE `image_token_id` (label -100).

        Text segments are tokenized each on its own with `add_special_tokens=False`; labels
        are the ids of trainable segments and -100 elsewhere.
        """
        input_ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            if segment.media is not None:
                input_ids.append(self.image_token_id)
                labels.append(IGNORE_INDEX)
                continue
            if not segment.text:
                continue
            if self.image_token in segment.text:
                raise ValueError(
                    f"a text segment contains {self.image_token!r}: {segment.text[:80]!r}; "
                    "media must be `Media` parts of a turn, not text, so that markers and "
                    "images stay counted"
                )
            ids = self._encode_text(segment.text, at_start=not input_ids)
            input_ids += ids
            labels += ids if segment.trainable else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        if at_start:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        ids = self.tokenizer(self.image_token + text, add_special_tokens=False).input_ids
        return ids[1:]  # drop the anchor (one token, checked in __init__)
