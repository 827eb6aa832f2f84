"""Chat templates: turns → segments tagged trainable or not, so labels are masked by construction.

A template never returns one string to be searched for separators after tokenizing: it
returns `Segment`s, each tokenized on its own by `lmm.data.tokenization.SegmentTokenizer`.
Segment boundaries sit where tokenizers split anyway: next to a special token, or just
BEFORE a space (BPE and SentencePiece attach a leading space to the word after it), never
after one; an answer's leading newlines join a header that ends in one. Templates are
chosen in YAML by `class_path`, e.g. `lmm.data.templates.Llama3`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from jsonargparse import ArgumentParser

from lmm.data.sample import IMAGE_MARKER, ROLES, Media, Part, Turn

__all__ = [
    "ChatML",
    "ChatTemplate",
    "CheetahLlama2",
    "CheetahVicuna",
    "Gemma",
    "Idefics2",
    "Llama2",
    "Llama3",
    "MantisFuyu",
    "MantisIdefics2",
    "MiphaGemma",
    "Phi",
    "Plain",
    "Qwen25",
    "Raw",
    "Segment",
    "VicunaV1",
    "build_template",
    "render_text",
    "trainable_text",
]

LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LEADING_NEWLINES = re.compile(r"\s*[\r\n]")  # leading whitespace up to its last newline

LabelPolicy = Literal["answers", "assistant_turn", "all_text"]
"""What a template trains: `answers` (each answer and its terminator: lmm's default),
`assistant_turn` (the assistant turn from its header through its terminator: Mantis's
`llama_3` / `SINGLE` / `idefics_2` masking, LLaVA-NeXT's `preprocess_qwen`), `all_text` (every text token,
media excluded: Mantis's `plain` pretraining)."""


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: text, or one media marker."""

    text: str = ""  # text to tokenize ("" for a media segment)
    media: int | None = None  # index into Sample.images when this segment is a media marker
    trainable: bool = False  # True only for assistant content and its terminator


def render_text(segments: Sequence[Segment]) -> str:
    """The whole text of `segments`, each media segment written as `<image>`."""
    return "".join(IMAGE_MARKER if s.media is not None else s.text for s in segments)


def trainable_text(segments: Sequence[Segment]) -> str:
    """The concatenated text of the trainable segments: what the loss is computed on."""
    return "".join(s.text for s in segments if s.trainable and s.media is None)


def _all_trainable(segments: list[Segment]) -> list[Segment]:
    """Every text segment trainable, adjacent text merged (`labels: all_text`)."""
    out = _Builder()
    for seg in segments:
        if seg.media is None:
            out.text(seg.text, trainable=True)
        else:
            out.segments.append(seg)
    return out.segments


class _Builder:
    """Collects segments, merging adjacent text with the same `trainable` flag."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def text(self, text: str, trainable: bool = False) -> None:
        last = self.segments[-1] if self.segments else None
        if trainable and last is not None and not last.trainable and last.text.endswith("\n"):
            # Llama-3's pre-tokenizer makes one token of a whitespace run that ends in newlines
            # (header "\n\n" + answer "\nred" → "\n\n\n", "red"), so such a run cannot be cut
            # between header and answer: the answer's leading newlines join the header.
            newlines = _LEADING_NEWLINES.match(text)
            if newlines:
                self.text(newlines.group())
                self.text(text[newlines.end() :], trainable)
                return
        if not text:
            return
        if last is not None and last.media is None and last.trainable == trainable:
            self.segments[-1] = Segment(text=last.text + text, trainable=trainable)
        else:
            self.segments.append(Segment(text=text, trainable=trainable))

    def media(self, index: int, image_text: str = "{image}") -> None:
        """The media marker `index`, inside its `image_text` (untrainable wrapper text)."""
        if image_text == "{image}":
            self.segments.append(Segment(media=index))
            return
        before, _, after = image_text.partition("{image}")
        self.text(before.format(k=index + 1, i=index))
        self.segments.append(Segment(media=index))
        self.text(after.format(k=index + 1, i=index))

    def parts(self, parts: Sequence[Part], trainable: bool = False, image_text: str = "{image}"):
        for part in parts:
            if isinstance(part, Media):
                self.media(part.index, image_text)
            else:
                self.text(part, trainable)


class ChatTemplate:
    """Base template: `bos`, a system block, then rounds of user turn, assistant header, answer.

    A round renders as `user_prefix + question + user_suffix + assistant_header` (untrainable),
    then `assistant_prefix + answer + assistant_end` (trainable), then `assistant_suffix`
    (untrainable). Subclasses set these strings and override a hook where a format differs.
    """

    special_tokens: ClassVar[tuple[str, ...]] = ()  # strings that must be single tokens
    stop_strings: ClassVar[tuple[str, ...]] = ()  # what ends an assistant turn at generation
    default_system: ClassVar[str | None] = None  # used when neither argument nor turn gives one
    default_bos: ClassVar[str] = ""  # written first, untrainable (unless labels="all_text")
    default_image_text: ClassVar[str] = "{image}"  # how a media marker is written
    system_format: ClassVar[str] = "{system}"
    user_prefix: ClassVar[str] = ""
    user_suffix: ClassVar[str] = ""
    assistant_header: ClassVar[str] = ""  # untrainable; the generation prompt ends with it
    assistant_prefix: ClassVar[str] = ""  # trainable, before the answer (a leading space)
    assistant_end: ClassVar[str] = ""  # trainable terminator: the model must learn to stop
    assistant_suffix: ClassVar[str] = ""  # untrainable, after the terminator

    def __init__(
        self,
        system: str | None = None,
        bos: str | None = None,
        image_text: str | None = None,
        labels: LabelPolicy = "answers",
        train_tokens: Sequence[str] = (),
    ):
        """
        Args:
            system: System prompt; None uses the template's default (which may be none),
                "" renders no system prompt. A leading system turn overrides it.
            bos: text written first (the tokenizer's BOS token, e.g. `<|begin_of_text|>`);
                None uses the template's default, "" writes none.
            image_text: how each media marker is written, `{image}` standing for the media
                tokens, `{k}` for its 1-based and `{i}` for its 0-based index in the sample
                (Mantis: `(image {k}: <Image>{image}</Image>)`); None: the template's default.
                The text around `{image}` is input, trained only under `labels: all_text`.
            labels: what is trained: `answers` (each answer and its terminator), `assistant_turn`
                (the assistant turn from its header through its terminator) or `all_text`
                (every text token); docs/data.md lists which seed does which.
            train_tokens: tokens trained wherever they stand, whatever `labels` says (LLaVA-NeXT's
                `preprocess_qwen` trains every `<|im_start|>`, `<|im_end|>` and `\n`); each must
                be one token of the tokenizer.
        """
        self.system = self.default_system if system is None else system
        self.bos = self.default_bos if bos is None else bos
        self.image_text = self.default_image_text if image_text is None else image_text
        if "{image}" not in self.image_text:
            raise ValueError(f"image_text {self.image_text!r} has no {{image}} placeholder")
        if labels not in ("answers", "assistant_turn", "all_text"):
            raise ValueError(f"labels must be answers, assistant_turn or all_text, got {labels!r}")
        self.labels = labels
        self.train_tokens = tuple(train_tokens)

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        """Segments of a conversation: an optional system turn, then user/assistant rounds.

        With `add_generation_prompt`, the turns end with a user turn and the untrainable
        assistant header is appended so that the model generates the answer.
        """
        system, rounds = self._rounds(turns, add_generation_prompt)
        out = _Builder()
        out.text(self.bos)
        if system:
            out.text(self._system_block(system))
        for i, (user, assistant) in enumerate(rounds):
            self._user(out, user, system if i == 0 else None)
            if assistant is None:  # the generation prompt
                out.text(self.assistant_header)
            else:
                self._assistant(out, assistant)
        if self.labels == "all_text" and not add_generation_prompt:
            return _all_trainable(out.segments)
        return out.segments

    # hooks --------------------------------------------------------------------------------

    def _system_block(self, system: str) -> str:
        return self.system_format.format(system=system)

    def _user(self, out: _Builder, turn: Turn, first_round_system: str | None) -> None:
        out.text(self.user_prefix)
        out.parts(turn.parts, image_text=self.image_text)
        out.text(self.user_suffix)

    def _assistant(self, out: _Builder, turn: Turn) -> None:
        whole = self.labels == "assistant_turn"
        out.text(self.assistant_header, trainable=whole)
        out.text(self.assistant_prefix, trainable=True)
        out.parts(turn.parts, trainable=True, image_text=self.image_text)
        out.text(self.assistant_end, trainable=True)
        out.text(self.assistant_suffix)

    # validation ---------------------------------------------------------------------------

    def _rounds(
        self, turns: Sequence[Turn], add_generation_prompt: bool
    ) -> tuple[str | None, list[tuple[Turn, Turn | None]]]:
        """The system prompt and the (user, assistant) rounds; raises on a malformed order."""
        name = type(self).__name__
        for i, turn in enumerate(turns):
            if turn.role not in ROLES:
                raise ValueError(
                    f"{name}: turn {i} has unknown role {turn.role!r}; expected one of {ROLES}"
                )
        system = self.system
        body = list(turns)
        if body and body[0].role == "system":
            if body[0].num_media:
                raise ValueError(f"{name}: the system turn holds media; put media in a user turn")
            system = body[0].text
            body = body[1:]
        if not body:
            raise ValueError(f"{name}: the conversation has no user turn")
        rounds: list[tuple[Turn, Turn | None]] = []
        for i, turn in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.role != expected:
                raise ValueError(
                    f"{name}: turn {i + len(turns) - len(body)} is {turn.role!r} but {expected!r} "
                    "was expected; a conversation is an optional leading system turn, then "
                    "user and assistant turns alternating, starting with user"
                )
            if expected == "user":
                rounds.append((turn, None))
            else:
                rounds[-1] = (rounds[-1][0], turn)
        if add_generation_prompt and rounds[-1][1] is not None:
            raise ValueError(
                f"{name}: add_generation_prompt=True needs the conversation to end with a user "
                "turn, but it ends with an assistant turn"
            )
        if not add_generation_prompt and rounds[-1][1] is None:
            raise ValueError(
                f"{name}: the conversation ends with a user turn and has no answer to train on; "
                "pass add_generation_prompt=True to render a prompt for generation"
            )
        return system, rounds


class Plain(ChatTemplate):
    """LLaVA stage-1 pretraining: media then caption; trainable: each answer and its `\\n`.

    Renders `[bos]<image>{a}\\n` per round: user text is dropped (as LLaVA's `plain` does) and so
    is any system prompt; only the user's media are kept, each written with `image_text` and
    followed by `media_separator`. `rounds` says which rounds a record may have: `all` (lmm),
    `first` (the sample's media, then its first answer only: Mantis's `plain`) or `one` (exactly
    one round with media, else the record is refused, as LLaVA's `preprocess_plain` asserts;
    the user turn becomes one `<image>`, so only the first image is fed).
    """

    stop_strings = ("\n",)
    assistant_end = "\n"

    def __init__(
        self,
        rounds: Literal["all", "first", "one"] = "all",
        media_separator: str = "",
        **kwargs,
    ):
        """
        Args:
            rounds: `all`, `first` or `one` (see the class docstring).
            media_separator: text after each media item (Mantis: " ").
            kwargs: system (ignored: plain pretraining writes no system prompt), bos (the
                tokenizer's BOS where the seed keeps it: LLaVA-1.5, Mantis, Mipha-Gemma; default
                none), image_text, labels (`answers`, or Mantis's `all_text`), train_tokens
                (see ChatTemplate).
        """
        super().__init__(**kwargs)
        if rounds not in ("all", "first", "one"):
            raise ValueError(f"rounds must be all, first or one, got {rounds!r}")
        self.rounds_policy = rounds
        self.media_separator = media_separator

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        name = type(self).__name__
        if self.rounds_policy == "all":
            return super().render(turns, add_generation_prompt)
        _, rounds = self._rounds(turns, add_generation_prompt)
        if not any(user.num_media for user, _ in rounds):
            raise ValueError(
                f"{name}(rounds={self.rounds_policy!r}): a pretraining record needs media; this "
                "one has none (the seeds' plain pretraining fails on it)"
            )
        if self.rounds_policy == "one":
            if len(rounds) != 1 or not rounds[0][0].num_media:
                raise ValueError(
                    f"{name}(rounds='one'): a pretraining record is one user turn with media and one "
                    f"answer (LLaVA's preprocess_plain), this one has {len(rounds)} rounds and "
                    f"{rounds[0][0].num_media} media in its first user turn"
                )
            # preprocess_plain replaces the user turn by one `<image>`: the first image only
            first = next(p for p in rounds[0][0].parts if isinstance(p, Media))
            media = [first]
        else:  # rounds="first": every media item of the conversation, then the first answer
            media = [p for user, _ in rounds for p in user.parts if isinstance(p, Media)]
        body = [Turn("user", list(media))]
        if rounds[0][1] is not None:
            body.append(rounds[0][1])
        return super().render(body, add_generation_prompt)

    def _system_block(self, system: str) -> str:
        return ""

    def _user(self, out: _Builder, turn: Turn, first_round_system: str | None) -> None:
        for part in turn.parts:
            if isinstance(part, Media):
                out.media(part.index, self.image_text)
                out.text(self.media_separator)


class Llama3(ChatTemplate):
    """Llama-3 Instruct (Mantis `llama_3`); trainable: `{a}<|eot_id|>`.

    `<|begin_of_text|>[<|start_header_id|>system<|end_header_id|>\\n\\n{sys}<|eot_id|>]`
    `<|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>`
    `<|start_header_id|>assistant<|end_header_id|>\\n\\n` + trainable `{a}<|eot_id|>`.
    No default system prompt.
    """

    special_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    stop_strings = ("<|eot_id|>",)
    default_bos = "<|begin_of_text|>"
    system_format = "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    user_prefix = "<|start_header_id|>user<|end_header_id|>\n\n"
    user_suffix = "<|eot_id|>"
    assistant_header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assistant_end = "<|eot_id|>"


class ChatML(ChatTemplate):
    """ChatML; trainable: `{a}<|im_end|>` (not the `\\n` after it).

    `<|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n`
    `<|im_start|>assistant\\n` + trainable `{a}<|im_end|>` + `\\n`.
    Default system prompt: "You are a helpful assistant."
    """

    special_tokens = ("<|im_start|>", "<|im_end|>")
    stop_strings = ("<|im_end|>",)
    default_system = "You are a helpful assistant."
    system_format = "<|im_start|>system\n{system}<|im_end|>\n"
    user_prefix = "<|im_start|>user\n"
    user_suffix = "<|im_end|>\n"
    assistant_header = "<|im_start|>assistant\n"
    assistant_end = "<|im_end|>"
    assistant_suffix = "\n"


class Qwen25(ChatML):
    """Qwen2.5 Instruct: ChatML with Qwen's default system prompt; trainable: `{a}<|im_end|>`."""

    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class _LlavaTwo(ChatTemplate):
    """LLaVA's "TWO" separator style: `{sys} USER: {q} ASSISTANT: {a}{sep2}USER: ...`."""

    default_system = LLAVA_SYSTEM
    system_format = "{system} "
    user_prefix = "USER: "
    user_suffix = " "
    assistant_header = "ASSISTANT:"
    # The space after `ASSISTANT:` belongs to the answer, so the boundary comes before it.
    assistant_prefix = " "


class Phi(_LlavaTwo):
    """Mipha / LLaVA-Phi (`v0`/phi, "TWO" style, sep2 `<|endoftext|>`); trainable: ` {a}<|endoftext|>`.

    `{sys} USER: {q} ASSISTANT: {a}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>`.
    Default system prompt: LLaVA's "A chat between a curious user and ...".
    """

    special_tokens = ("<|endoftext|>",)
    stop_strings = ("<|endoftext|>",)
    assistant_end = "<|endoftext|>"


class VicunaV1(_LlavaTwo):
    """Vicuna v1 (LLaVA `vicuna_v1`, "TWO" style, sep2 `</s>`); trainable: ` {a}</s>`.

    `<s>{sys} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>`.
    Default system prompt: LLaVA's "A chat between a curious user and ...".
    """

    special_tokens = ("<s>", "</s>")
    stop_strings = ("</s>",)
    default_bos = "<s>"
    assistant_end = "</s>"


class MiphaGemma(_LlavaTwo):
    """Mipha-2.4B on Gemma (Mipha's `conv_gemma_2`, "TWO" style, sep2 `<eos>`); trainable:
    ` {a}<eos>`.

    `<bos>{sys} USER: {q} ASSISTANT: {a}<eos>USER: {q2} ASSISTANT: {a2}<eos>`, LLaVA's default
    system prompt (zhuyiche/llava-phi 21dafbf, mipha/conversation.py; `--version gemma`).
    """

    special_tokens = ("<bos>", "<eos>")
    stop_strings = ("<eos>",)
    default_bos = "<bos>"
    assistant_end = "<eos>"


class Gemma(ChatTemplate):
    """Gemma instruct turns; trainable: `{a}<end_of_turn>` (not the `\\n` after it).

    `<bos><start_of_turn>user\\n{q}<end_of_turn>\\n<start_of_turn>model\\n` + trainable
    `{a}<end_of_turn>` + `\\n`. Gemma has no system role: a system prompt (default none) is
    prepended to the first user message, followed by `\\n\\n`.
    """

    special_tokens = ("<bos>", "<start_of_turn>", "<end_of_turn>")
    stop_strings = ("<end_of_turn>",)
    default_bos = "<bos>"
    user_prefix = "<start_of_turn>user\n"
    user_suffix = "<end_of_turn>\n"
    assistant_header = "<start_of_turn>model\n"
    assistant_end = "<end_of_turn>"
    assistant_suffix = "\n"

    def _system_block(self, system: str) -> str:
        return ""  # goes into the first user turn

    def _user(self, out: _Builder, turn: Turn, first_round_system: str | None) -> None:
        out.text(self.user_prefix)
        if first_round_system:
            out.text(first_round_system + "\n\n")
        out.parts(turn.parts, image_text=self.image_text)
        out.text(self.user_suffix)


class Llama2(ChatTemplate):
    """Llama-2-chat (LLaVA `llama_2`, Cheetah); trainable: ` {a} </s>`.

    `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>`;
    with no system prompt (the default) there is no `<<SYS>>` block.
    """

    special_tokens = ("<s>", "</s>")
    stop_strings = ("</s>",)
    user_prefix = "<s>[INST] "
    user_suffix = " [/INST]"
    assistant_prefix = " "
    assistant_end = " </s>"

    def _system_block(self, system: str) -> str:
        return ""  # goes into the first [INST] block

    def _user(self, out: _Builder, turn: Turn, first_round_system: str | None) -> None:
        out.text(self.user_prefix)
        if first_round_system:
            out.text(f"<<SYS>>\n{first_round_system}\n<</SYS>>\n\n")
        out.parts(turn.parts, image_text=self.image_text)
        out.text(self.user_suffix)


class _Cheetah(ChatTemplate):
    """Cheetah's prompts: each image as `<Img><image></Img>`; the system part always written.

    Cheetah writes `<Img><HereForImage></Img>` per image. The default system prompt is "", so
    `_user` gets `first_round_system=""` in the first round and None after it.
    """

    default_system = ""
    default_image_text = "<Img>{image}</Img>"
    apart_header: ClassVar[str] = ""  # the prompt's end when the answer is tokenized apart

    def __init__(self, answer_apart: bool = False, **kwargs):
        """
        Args:
            answer_apart: split prompt and answer as Cheetah's `forward` does: its prompt
                template's end stays in the prompt (Vicuna's trailing space is a lone `▁`,
                untrained) and the answer starts a string of its own (`▁{a}`); pair it with
                `preprocessing.tokenization: chunks`. False: the space before the answer is
                trained with it, the text tokenized as one.
            kwargs: system, bos, image_text, labels, train_tokens (see ChatTemplate).
        """
        super().__init__(**kwargs)
        if answer_apart:
            self.assistant_header = self.apart_header
            self.assistant_prefix = ""

    def _system_block(self, system: str) -> str:
        return ""  # goes into the first user turn


class CheetahVicuna(_Cheetah):
    """Cheetah with Vicuna-7B v0 (`###` separators); trainable: ` {a}###`.

    `<s>{sys}###Human: {q} ###Assistant: {a}###Human: {q2} ###Assistant: {a2}###`, each image
    as `<Img><image></Img>`; the system prompt is empty by default. This is Cheetah's training
    prompt `'###Human: {} ###Assistant: '` + answer + end_sym `'###'` after a BOS, and its
    chat prompt (`CONV_VISION`, sep `###`) for later rounds: an answer's `###` starts the next
    `Human:`. Cheetah tokenizes the prompt and the answer apart (a lone `▁` after `Assistant:`);
    here the space belongs to the answer and the text is tokenized as one.
    """

    special_tokens = ("<s>",)
    stop_strings = ("###",)
    default_bos = "<s>"
    user_prefix = "Human: "
    user_suffix = " ###"
    assistant_header = "Assistant:"
    assistant_prefix = " "
    assistant_end = "###"
    apart_header = "Assistant: "  # '###Human: {} ###Assistant: ', the space in the prompt

    def _user(self, out: _Builder, turn: Turn, first_round_system: str | None) -> None:
        if first_round_system is not None:  # the first round: `{sys}###`, empty sys included
            out.text(first_round_system + "###")
        out.text(self.user_prefix)
        out.parts(turn.parts, image_text=self.image_text)
        out.text(self.user_suffix)


class CheetahLlama2(_Cheetah):
    """Cheetah with LLaMA-2-7B-chat: the `<<SYS>>` block always written; trainable: ` {a}</s>`.

    `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a}</s><s>[INST] {q2} [/INST] {a2}</s>`,
    each image as `<Img><image></Img>`; with the default empty system prompt the first turn
    starts `<s>[INST] <<SYS>>\\n\\n<</SYS>>\\n\\n`, Cheetah's `'[INST] <<SYS>>\\n\\n<</SYS>>\\n\\n{}
    [/INST]'` after a BOS, and the answer ends with its end_sym `</s>` (no space before it).
    """

    special_tokens = ("<s>", "</s>")
    stop_strings = ("</s>",)
    user_prefix = "<s>[INST] "
    user_suffix = " [/INST]"
    assistant_prefix = " "
    assistant_end = "</s>"

    def _user(self, out: _Builder, turn: Turn, first_round_system: str | None) -> None:
        out.text(self.user_prefix)
        if first_round_system is not None:  # the first round, empty system prompt included
            out.text(f"<<SYS>>\n{first_round_system}\n<</SYS>>\n\n")
        out.parts(turn.parts, image_text=self.image_text)
        out.text(self.user_suffix)


class Idefics2(ChatTemplate):
    """Idefics2 (transformers' chat template, Mantis-Idefics2); trainable: ` {a}<end_of_utterance>`.

    `<s>User:<image>{q}<end_of_utterance>\\nAssistant: {a}<end_of_utterance>\\n` — a role is
    followed by `:` when its message starts with an image, else by `: `; a system prompt
    (default none) is a `System: {sys}<end_of_utterance>\\n` turn. As transformers'
    `Idefics2Processor` (5.x) does, text right after an image gets a leading space unless it
    starts with whitespace or `<` (`<image>What` → `<image> What`), which keeps SentencePiece
    word boundaries. Mantis's own `idefics_2` conversation writes `User:{q}` / `Assistant:{a}`
    with no space and trains the `\\nAssistant:` header too; lmm follows transformers' template
    and trains the answer and its `<end_of_utterance>` only.
    """

    special_tokens = ("<s>", "<end_of_utterance>")
    stop_strings = ("<end_of_utterance>",)
    default_bos = "<s>"
    system_format = "System: {system}<end_of_utterance>\n"
    user_suffix = "<end_of_utterance>\n"
    assistant_header = "Assistant:"
    assistant_prefix = " "
    assistant_end = "<end_of_utterance>"
    assistant_suffix = "\n"

    def _user(self, out: _Builder, turn: Turn, first_round_system: str | None) -> None:
        parts = turn.parts
        out.text("User:" if parts and isinstance(parts[0], Media) else "User: ")
        after_media = False
        for part in parts:
            if isinstance(part, Media):
                out.media(part.index, self.image_text)
                after_media = True
                continue
            if after_media and part and not part[0].isspace() and part[0] != "<":
                part = " " + part
            out.text(part)
            after_media = False
        out.text(self.user_suffix)


class MantisIdefics2(ChatTemplate):
    """Mantis's own `idefics_2` conversation (Mantis-8B-Idefics2, VideoScore's base); trainable:
    `\\nAssistant:{a}<end_of_utterance>` with `labels: assistant_turn`.

    `<s>User:{q}<end_of_utterance>\\nAssistant:{a}<end_of_utterance>\\nUser:...`: no space after
    a role's colon, text written as it is (TIGER-AI-Lab/Mantis f3a3192,
    mantis/train/conversation.py `conv_idefics_2`). No system prompt. `Idefics2` is
    transformers' template instead.
    """

    special_tokens = ("<s>", "<end_of_utterance>")
    stop_strings = ("<end_of_utterance>",)
    default_bos = "<s>"
    user_prefix = "User:"
    user_suffix = "<end_of_utterance>"
    assistant_header = "\nAssistant:"
    assistant_end = "<end_of_utterance>"
    assistant_suffix = "\n"


class Raw(ChatTemplate):
    """The user's text as written after `bos`, nothing around it: prompts that carry their own
    format (Mantis's `ClassificationDataset`, which VideoScore trains on, tokenizes the prompt
    as is). Answers, if any, follow directly; nothing marks them."""

    def _system_block(self, system: str) -> str:
        return ""


MFUYU_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


class MantisFuyu(ChatTemplate):
    """Mantis-Fuyu (`conv_mfuyu_v1` + MFuyuProcessor's image labels); trainable: ` {a}|ENDOFTEXT|`.

    `<s>{sys}\\nUSER: {q}<0x04>ASSISTANT: {a}|ENDOFTEXT|USER: {q2}<0x04>ASSISTANT: ...`, `<0x04>`
    being Fuyu's beginning-of-answer token. Each image of a user turn is written
    `image {i}: <image>` (`i` its index in the sample, from 0), as MFuyuProcessor labels them;
    the tokens around an image's patches (`|IMAGE|`, `|ENDOFIMAGE|`, `<s>`) are the family's
    (`lmm.families.fuyu.FuyuModel` `image_prefix` / `image_suffix`). Default system prompt:
    Mantis's "You are a helpful language and vision assistant. ...". Mantis trains from the
    token after `<0x04>` (the `ASSISTANT:` header too: `labels: assistant_turn`); by default
    lmm trains the answer and its end.
    """

    special_tokens = ("<s>", "<0x04>", "|ENDOFTEXT|")
    stop_strings = ("|ENDOFTEXT|",)
    default_system = MFUYU_SYSTEM
    default_bos = "<s>"
    system_format = "{system}\n"
    user_prefix = "USER: "
    user_suffix = "<0x04>"
    assistant_header = "ASSISTANT:"
    assistant_prefix = " "
    assistant_end = "|ENDOFTEXT|"
    default_image_text = "image {i}: {image}"  # MFuyuProcessor's labels, counted from 0

    def __init__(self, bos_without_media: bool = True, **kwargs):
        """
        Args:
            bos_without_media: write `bos` in a conversation without media too. False is
                Mantis's: MFuyuProcessor writes `<s>` at the start of each text chunk only
                when a record has images; a text-only record is tokenized without it.
            kwargs: system, bos, image_text, labels, train_tokens (see ChatTemplate).
        """
        super().__init__(**kwargs)
        self.bos_without_media = bos_without_media

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        segments = super().render(turns, add_generation_prompt)
        has_media = any(s.media is not None for s in segments)
        if self.bos and not self.bos_without_media and not has_media:
            first = segments[0]  # the bos starts the first text segment
            segments[0] = Segment(first.text[len(self.bos) :], first.media, first.trainable)
        return segments


def build_template(template: ChatTemplate | str | Mapping | type) -> ChatTemplate:
    """A template instance from an instance, a class, a class path or `{class_path, init_args}`."""
    if isinstance(template, ChatTemplate):
        return template
    if isinstance(template, type) and issubclass(template, ChatTemplate):
        return template()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ChatTemplate, "template", required=True)
    parsed = parser.parse_object({"template": template})
    return parser.instantiate_classes(parsed).template
