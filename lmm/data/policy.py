"""How records become token sequences where the seeds differ: marker placement, truncation, quirks.

lmm's defaults are the clean ones; each seed recipe sets the values its seed's own code has
(docs/data.md, "Seed fidelity", lists them with the source files they were read from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

MarkerPlacement = Literal["keep", "turn_start", "turn_start_unless_first"]
UnmarkedMedia = Literal["newline", "prepend", "drop", "refuse"]
Truncation = Literal["drop_rounds", "cut_tail", "cut_tail_text", "refuse"]
Tokenization = Literal["whole", "media", "legacy", "chunks"]
SentencePiece = Literal["off", "legacy", "non_legacy"]
SystemTurn = Literal["use", "refuse", "drop"]
LeadingAssistant = Literal["refuse", "drop"]


@dataclass(frozen=True)
class Preprocessing:
    """Reader and processor policies (the template decides the text and what is trained).

    Attributes:
        marker_placement: where a turn's `<image>` marker goes. `keep`: where it is written
            (lmm). `turn_start`: a turn with one marker loses it, is stripped, and starts with
            `<image>\\n` (LLaVA-1.5 / LLaVA-Phi / Mipha `preprocess_multimodal`).
            `turn_start_unless_first`: the same, but a turn that already starts with its marker
            is left as written (LLaVA-NeXT, MAmmoTH-VL).
        unmarked_media: images of a record whose text has no marker. `newline`: `<image>\\n` per
            image at the start of the first user turn (lmm). `prepend`: `<image>` per image
            there, nothing between (Mantis, which also prepends the missing markers when a
            record has fewer markers than images, and removes the markers beyond the images).
            `drop`: the images are not fed (LLaVA-family code loads them but places no image
            token, so the model never sees them).
            `refuse`: the record is refused (Cheetah asserts one placeholder per image).
        truncation: a sample longer than `max_length`. `drop_rounds`: whole rounds dropped from
            the end (lmm; never part of an answer). `cut_tail`: the token sequence cut after
            media expansion (LLaVA-1.5 and LLaVA-NeXT `prepare_inputs_labels_for_multimodal`);
            a cut inside a media item's tokens is an error naming the record. `cut_tail_text`:
            cut before expansion, each marker counting one token, media whose marker is cut
            dropped (Mantis's processor `truncation=True`; LLaVA-Phi / Mipha's collator).
            `refuse`: the record is refused (a counted skip with `on_bad_record: skip`):
            Mantis-Fuyu's processor drops the first text chunk that does not fit and all after
            it, which leaves a record whose images come first without a trained token.
        tokenization: where a new string starts, which a SentencePiece tokenizer marks with
            its `▁` prefix. `whole`: only at the start (the ids of the whole text, lmm).
            `media`: also after each media marker (LLaVA's `tokenizer_image_token` tokenizes
            the text between images chunk by chunk). `legacy`: also after each special token
            (transformers' `legacy=True` Llama tokenizers, e.g. Idefics2's). `chunks`: after
            each media marker and at each answer (Cheetah's `forward` tokenizes the prompt
            pieces and the answer apart). Byte-level BPE tokenizers (Llama-3, Qwen, GPT-2) give
            the same ids in every mode.
        sentencepiece: `off`: text encoded by the tokenizer. `legacy` / `non_legacy`: by the
            sentencepiece library on the tokenizer's `tokenizer.model`, as transformers 4's
            slow (`use_fast=False`) Llama tokenizer with that `legacy` flag (LLaVA-1.5:
            non_legacy; Cheetah: legacy for Vicuna, non_legacy for LLaMA-2).
        strip_special: text next to a special token loses its whitespace on that side, as the
            slow tokenizers of transformers < 4.34 did (Cheetah's 4.31: `" red.\\n\\n</s>"` is
            tokenized as `" red.</s>"`).
        drop_tokens: tokens removed from the sequence before the model sees it (LLaVA-Phi /
            Mipha set pad = eos = `<|endoftext|>`: their collator's `attention_mask = ids != pad`
            hides every terminator and `prepare_inputs_labels_for_multimodal` then drops the
            hidden positions, so the model never sees or learns `<|endoftext|>`).
        mask_tokens: tokens kept in the sequence but hidden from attention: no later token
            attends to them (LLaVA-Phi / Mipha: their collator's `attention_mask = ids != pad`
            with pad = eos = `<|endoftext|>` hides every terminator, and their model keeps
            the positions). Samples with hidden tokens are padded, not packed; prompts for
            generation attend to every token, as the seeds' inference does.
        max_images: records with more images are refused (LLaVA-1.5, LLaVA-Phi and Mipha read
            one image path per record and fail on a list); None: no limit.
        min_images: records with fewer images are refused (Cheetah stacks the images of a
            record and fails on none).
        answer_max_tokens: each answer's trained tokens (terminator included) capped at this
            many (Cheetah's `max_txt_len`: 160 Vicuna, 360 LLaMA-2); None: no cap.
        leading_assistant: a conversation that starts with an assistant turn: `refuse` it (lmm)
            or `drop` that turn (LLaVA's and Mantis's readers skip a first non-human turn).
        system_turn: a record's leading system turn: `use` it as the system prompt (lmm),
            `refuse` the record (the LLaVA-family and Mantis readers fail on a `system` role),
            or `drop` the turn (Cheetah's prompt has no place for one).
    """

    marker_placement: MarkerPlacement = "keep"
    unmarked_media: UnmarkedMedia = "newline"
    truncation: Truncation = "drop_rounds"
    tokenization: Tokenization = "whole"
    sentencepiece: SentencePiece = "off"
    strip_special: bool = False
    drop_tokens: tuple[str, ...] = ()
    mask_tokens: tuple[str, ...] = ()
    max_images: int | None = None
    min_images: int = 0
    answer_max_tokens: int | None = None
    system_turn: SystemTurn = "use"
    leading_assistant: LeadingAssistant = "refuse"

    def __post_init__(self) -> None:
        for name, kind in _CHOICES.items():
            allowed = get_args(kind)
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        object.__setattr__(self, "drop_tokens", tuple(self.drop_tokens))
        object.__setattr__(self, "mask_tokens", tuple(self.mask_tokens))
        if self.answer_max_tokens is not None and self.answer_max_tokens < 1:
            raise ValueError(f"answer_max_tokens must be >= 1, got {self.answer_max_tokens}")


_CHOICES = {
    "marker_placement": MarkerPlacement,
    "unmarked_media": UnmarkedMedia,
    "truncation": Truncation,
    "tokenization": Tokenization,
    "sentencepiece": SentencePiece,
    "system_turn": SystemTurn,
    "leading_assistant": LeadingAssistant,
}
DEFAULT = Preprocessing()
