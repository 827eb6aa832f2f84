"""ChatTemplate, the base of every chat template: turns → segments tagged trainable or not.

A template never returns one string to be searched for separators after tokenizing: it
returns `Segment`s, each tokenized on its own by `lmm.data.tokenization.SegmentTokenizer`, so
labels are masked by construction. Segment boundaries sit where tokenizers split anyway: next
to a special token, or just BEFORE a space (BPE and SentencePiece attach a leading space to the
word after it), never after one; an answer's leading newlines join a header that ends in one.
The seeds' templates (`lmm.data.templates`) set its strings and override its hooks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from lmm.data.sample import IMAGE_MARKER, ROLES, Media, Part, Turn

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
    out = SegmentBuilder()
    for seg in segments:
        if seg.media is None:
            out.text(seg.text, trainable=True)
        else:
            out.segments.append(seg)
    return out.segments


class SegmentBuilder:
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
    # what ends an assistant turn at generation: its `assistant_end` (stripped, unless it is all
    # whitespace), set for every template that declares one and no stop strings of its own
    stop_strings: ClassVar[tuple[str, ...]] = ()
    default_system: ClassVar[str | None] = None  # used when neither argument nor turn gives one
    default_bos: ClassVar[str] = ""  # written first, untrainable (unless labels="all_text")
    default_image_text: ClassVar[str] = "{image}"  # how a media marker is written
    system_format: ClassVar[str] = "{system}"  # "": no system block (none, or in a user turn)
    user_prefix: ClassVar[str] = ""
    # The first round's user prefix when a system prompt goes inside it, `{system}` standing
    # for the prompt (Llama-2's `<<SYS>>` block); "": `user_prefix`.
    first_user_prefix: ClassVar[str] = ""
    user_suffix: ClassVar[str] = ""
    assistant_header: ClassVar[str] = ""  # untrainable; the generation prompt ends with it
    assistant_prefix: ClassVar[str] = ""  # trainable, before the answer (a leading space)
    assistant_end: ClassVar[str] = ""  # trainable terminator: the model must learn to stop
    assistant_suffix: ClassVar[str] = ""  # untrainable, after the terminator

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        end = cls.__dict__.get("assistant_end")
        if end and "stop_strings" not in cls.__dict__:
            cls.stop_strings = (end.strip() or end,)

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
        out = SegmentBuilder()
        out.text(self.bos)
        if system:
            out.text(self.system_format.format(system=system))
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

    def _user(self, out: SegmentBuilder, turn: Turn, first_round_system: str | None) -> None:
        out.text(self._user_prefix(first_round_system))
        out.parts(turn.parts, image_text=self.image_text)
        out.text(self.user_suffix)

    def _user_prefix(self, first_round_system: str | None) -> str:
        """What opens a user turn; `first_round_system` is the system prompt in the first round
        (None after it): `first_user_prefix` holds it when there is one."""
        if first_round_system and self.first_user_prefix:
            return self.first_user_prefix.format(system=first_round_system)
        return self.user_prefix

    def _assistant(self, out: SegmentBuilder, turn: Turn) -> None:
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
