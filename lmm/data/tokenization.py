"""Segment-by-segment tokenization: template segments → input_ids and labels masked per segment."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmm.data.sample import IMAGE_MARKER
from lmm.data.templates import Segment
from lmm.utils.logging import get_logger

log = get_logger(__name__)

IGNORE_INDEX = -100


def load_tokenizer(
    path: str, image_token: str = IMAGE_MARKER, published_stub: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has the image token and a pad token (as special tokens).

    `published_stub` (a meta build: sizes only): a hub id with no files here whose published
    tokenizer length lmm ships gets a stub of that length (`lmm.published.stub_tokenizer`),
    so the embeddings grow as with the real one; it cannot tokenize text."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError:
        import lmm.published as published

        found = published.facts(path)
        if not published_stub or Path(path).exists() or not (found and "tokenizer" in found):
            raise
        log.info("%s: no files here; a stub tokenizer of its published length", path)
        tokenizer = published.stub_tokenizer(path)
    added = []
    if image_token not in tokenizer.get_vocab():
        added.append(image_token)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[str]:
    """Make each token one special token: new ones are appended, known ones keep their id.

    A family's structural tokens (Fuyu's `|SPEAKER|` and `|NEWLINE|`, ordinary pieces of its
    own tokenizer that a SentencePiece prefix `▁` may come before; Idefics2's
    `<fake_token_around_image>`) are never split or prefixed as special tokens. Returns the
    tokens that were not in the vocabulary (the LLM's embeddings grow by as many).
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    unsplit = [
        t
        for t in dict.fromkeys(tokens)
        if t in vocab and len(tokenizer(t, add_special_tokens=False).input_ids) != 1
    ]
    if new or unsplit:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": new + unsplit}, replace_extra_special_tokens=False
        )
    if new:
        log.info("added %s to the tokenizer (the LLM's embeddings grow)", new)
    return new


def checkpoint_tokenizer(
    name: str | Path, image_token: str | None = IMAGE_MARKER
) -> PreTrainedTokenizerBase:
    """A checkpoint's tokenizer for an import (`load_tokenizer`; as saved with `image_token`
    None), or an error that says to pass the tokenizer's folder."""
    try:
        if image_token is None:
            return AutoTokenizer.from_pretrained(str(name))
        return load_tokenizer(str(name), image_token)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{name}: cannot load a tokenizer ({err}); pass tokenizer / --tokenizer with the "
            "folder of the checkpoint's tokenizer"
        ) from err


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

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = IMAGE_MARKER,
        mode: Literal["whole", "media", "legacy", "chunks"] = "whole",
        sentencepiece: Literal["off", "legacy", "non_legacy"] = "off",
        strip_special: bool = False,
    ):
        """
        Args:
            tokenizer: The language model's tokenizer, with `image_token` added as a special token.
            image_token: The placeholder a media segment becomes (one token; the processor
                expands it to the family's number of media tokens).
            mode: where a new string starts (lmm.data.policy.Preprocessing.tokenization):
                `whole` (ids equal those of the whole text), `media` (after each media
                placeholder), `legacy` (after each special token and media placeholder) or
                `chunks` (after each media placeholder and at each answer).
            sentencepiece: `off` encodes text with `tokenizer`; `legacy` / `non_legacy` with the
                sentencepiece library on the tokenizer's `tokenizer.model`, as transformers 4's
                slow (`use_fast=False`) Llama tokenizer with that `legacy` flag does: runs of
                spaces split differently there than in the converted fast tokenizer.
            strip_special: text next to a special token loses its whitespace on that side, as
                transformers < 4.34's slow tokenizers did for special tokens given as strings.
        """
        if mode not in ("whole", "media", "legacy", "chunks"):
            raise ValueError(f"tokenization must be whole, media, legacy or chunks, got {mode!r}")
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.fresh_after_media = mode != "whole"
        self.legacy = mode == "legacy"
        self.chunks = mode == "chunks"
        self.sp = None if sentencepiece == "off" else SentencePieceText(tokenizer, sentencepiece)
        self.strip_special = strip_special
        added = sorted(
            set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens),
            key=len,
            reverse=True,
        )
        self._special = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        ids = tokenizer(image_token, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no single token for {image_token!r} (it encodes to {ids}); "
                "add it as a special token before training: tokenizer.add_special_tokens("
                f"{{'additional_special_tokens': [{image_token!r}]}}) and resize the model's "
                "embeddings"
            )
        self.image_token_id: int = ids[0]
        # A `legacy` SentencePiece pipeline (the hub tokenizer.json of Mistral, Idefics2, Fuyu)
        # prefixes `▁` after a special token too, so the anchor cannot stand for the middle of
        # a string there: a newline (a byte token that merges with nothing) anchors instead.
        self._newline_anchor: list[int] | None = None
        plain = tokenizer("x", add_special_tokens=False).input_ids
        prefixed = tokenizer.convert_ids_to_tokens(plain[:1])[0].startswith("\u2581")
        after = tokenizer(image_token + "x", add_special_tokens=False).input_ids[1:]
        if prefixed and after == plain:
            self._newline_anchor = tokenizer("\n", add_special_tokens=False).input_ids

    def encode(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """input_ids and labels; each media segment becomes ONE `image_token_id` (label -100).

        Text segments are tokenized each on its own with `add_special_tokens=False`; labels
        are the ids of trainable segments and -100 elsewhere.
        """
        input_ids: list[int] = []
        labels: list[int] = []
        after_special = True  # the start of the sequence counts as a fresh string
        trainable = False
        for segment in segments:
            if segment.media is not None:
                input_ids.append(self.image_token_id)
                labels.append(IGNORE_INDEX)
                after_special = self.fresh_after_media
                continue
            if not segment.text:
                continue
            if self.image_token in segment.text:
                raise ValueError(
                    f"a text segment contains {self.image_token!r}: {segment.text[:80]!r}; "
                    "media must be `Media` parts of a turn, not text, so that markers and "
                    "images stay counted"
                )
            if self.chunks and segment.trainable and not trainable:
                after_special = True  # an answer is tokenized as a string of its own
            trainable = segment.trainable
            if self.legacy or self.sp is not None or self.strip_special:
                ids = []
                pieces = self._special.split(segment.text) if self._special else [segment.text]
                if self.strip_special:
                    pieces = _strip_next_to_special(pieces)
                for piece in pieces:
                    if not piece:
                        continue
                    if self._special and self._special.fullmatch(piece):
                        # a leading special token (the template's BOS) stands where the
                        # tokenizer would add it: the text after it still starts the string
                        after_special = self.legacy or not (input_ids or ids)
                        ids += self.tokenizer.convert_tokens_to_ids([piece])
                    else:
                        ids += self._encode_text(piece, at_start=after_special)
                        after_special = False
            else:
                ids = self._encode_text(segment.text, at_start=after_special)
                after_special = False
            input_ids += ids
            labels += ids if segment.trainable else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        if self.sp is not None:
            return self.sp.encode(text, at_start)
        if at_start:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        if self._newline_anchor is not None:
            anchor = self._newline_anchor
            ids = self.tokenizer("\n" + text, add_special_tokens=False).input_ids
            if ids[: len(anchor)] == anchor:
                return ids[len(anchor) :]
        ids = self.tokenizer(self.image_token + text, add_special_tokens=False).input_ids
        return ids[1:]  # drop the anchor (one token, checked in __init__)


def _strip_next_to_special(pieces: list[str]) -> list[str]:
    """`re.split` pieces (text, special, text, ...) with the whitespace next to each special gone."""
    out = list(pieces)
    for k in range(0, len(out), 2):  # text pieces sit at even indices
        if k > 0:
            out[k] = out[k].lstrip()
        if k + 1 < len(out):
            out[k] = out[k].rstrip()
    return out


class SentencePieceText:
    """Text → ids as transformers 4's slow `LlamaTokenizer` encodes text between special tokens.

    The seeds that load their tokenizer with `use_fast=False` (LLaVA-1.5, Cheetah) tokenized
    with the sentencepiece library, whose merges differ from the converted fast tokenizer on
    runs of spaces (`"at  and"`: `▁at ▁ ▁and` here, `▁at ▁▁ and` in transformers 5).
    `legacy=True` gives every piece SentencePiece's dummy `▁` prefix; `legacy=False` (transformers
    >= 4.36 with `legacy: false`) prefixes only a string's start, and encodes text that starts
    with a space behind an `<unk>` anchor (transformers' own trick), then drops the anchor.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, flavour: str):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        if flavour not in ("legacy", "non_legacy"):
            raise ValueError(f"sentencepiece must be off, legacy or non_legacy, got {flavour!r}")
        path = getattr(tokenizer, "vocab_file", None)
        if not path:
            raise ValueError(
                "sentencepiece: legacy/non_legacy needs the tokenizer's SentencePiece model "
                "(tokenizer.model next to the tokenizer files); this tokenizer has none"
            )
        self.legacy = flavour == "legacy"
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(path).read_bytes())
        if not self.legacy:
            proto.normalizer_spec.add_dummy_prefix = False  # as transformers' get_spm_processor
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.unk = "<unk>"
        self.unk_length = len(self.sp.encode(self.unk))

    def encode(self, text: str, at_start: bool) -> list[int]:
        """The ids of `text`: as a string of its own (`at_start`) or continuing the last one."""
        if self.legacy:
            if at_start:
                return self.sp.encode(text)
            return self.sp.encode(self.unk + text)[self.unk_length :]
        text = text.replace("\u2581", " ")
        if at_start:
            text = "\u2581" + text
        if not text.startswith(("\u2581", " ")):
            return self.sp.encode(text)
        return self.sp.encode(self.unk + text)[self.unk_length :]
