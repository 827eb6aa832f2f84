"""The seeds' chat templates (Llama-3, ChatML, LLaVA's, Gemma, Llama-2, Cheetah's, Idefics2,
Mantis's, ...) and `build_template`; the base class and `Segment` are in `lmm.data.chat_template`.

Templates are chosen in YAML by `class_path`, e.g. `lmm.data.templates.Llama3`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

from jsonargparse import ArgumentParser

from lmm.data.chat_template import (
    ChatTemplate,
    Segment,
    SegmentBuilder,
    render_text,
    trainable_text,
)
from lmm.data.sample import IMAGE_MARKER, Media, Turn

__all__ = [
    "ChatML",
    "ChatTemplate",
    "CheetahLlama2",
    "CheetahVicuna",
    "Fuyu",
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
    "match_chat_template",
    "render_text",
    "trainable_text",
]

LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class Plain(ChatTemplate):
    """LLaVA stage-1 pretraining: media then caption; trainable: each answer and its `\\n`.

    Renders `[bos]<image>{a}\\n` per round: user text is dropped (as LLaVA's `plain` does) and so
    is any system prompt; only the user's media are kept, each written with `image_text` and
    followed by `media_separator`. `rounds` says which rounds a record may have: `all` (lmm),
    `first` (the sample's media, then its first answer only: Mantis's `plain`) or `one` (exactly
    one round with media, else the record is refused, as LLaVA's `preprocess_plain` asserts;
    the user turn becomes one `<image>`, so only the first image is fed).
    """

    system_format = ""
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

    def _user(self, out: SegmentBuilder, turn: Turn, first_round_system: str | None) -> None:
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
    assistant_end = "<|endoftext|>"


class VicunaV1(_LlavaTwo):
    """Vicuna v1 (LLaVA `vicuna_v1`, "TWO" style, sep2 `</s>`); trainable: ` {a}</s>`.

    `<s>{sys} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>`.
    Default system prompt: LLaVA's "A chat between a curious user and ...".
    """

    special_tokens = ("<s>", "</s>")
    default_bos = "<s>"
    assistant_end = "</s>"


class MiphaGemma(_LlavaTwo):
    """Mipha-2.4B on Gemma (Mipha's `conv_gemma_2`, "TWO" style, sep2 `<eos>`); trainable:
    ` {a}<eos>`.

    `<bos>{sys} USER: {q} ASSISTANT: {a}<eos>USER: {q2} ASSISTANT: {a2}<eos>`, LLaVA's default
    system prompt (zhuyiche/llava-phi 21dafbf, mipha/conversation.py; `--version gemma`).
    """

    special_tokens = ("<bos>", "<eos>")
    default_bos = "<bos>"
    assistant_end = "<eos>"


class Gemma(ChatTemplate):
    """Gemma instruct turns; trainable: `{a}<end_of_turn>` (not the `\\n` after it).

    `<bos><start_of_turn>user\\n{q}<end_of_turn>\\n<start_of_turn>model\\n` + trainable
    `{a}<end_of_turn>` + `\\n`. Gemma has no system role: a system prompt (default none) is
    prepended to the first user message, followed by `\\n\\n`.
    """

    special_tokens = ("<bos>", "<start_of_turn>", "<end_of_turn>")
    default_bos = "<bos>"
    system_format = ""  # the system prompt goes into the first user turn
    user_prefix = "<start_of_turn>user\n"
    first_user_prefix = "<start_of_turn>user\n{system}\n\n"
    user_suffix = "<end_of_turn>\n"
    assistant_header = "<start_of_turn>model\n"
    assistant_end = "<end_of_turn>"
    assistant_suffix = "\n"


class Llama2(ChatTemplate):
    """Llama-2-chat (LLaVA `llama_2`, Cheetah); trainable: ` {a} </s>`.

    `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>`;
    with no system prompt (the default) there is no `<<SYS>>` block.
    """

    special_tokens = ("<s>", "</s>")
    system_format = ""  # the system prompt goes into the first [INST] block
    user_prefix = "<s>[INST] "
    first_user_prefix = "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"
    user_suffix = " [/INST]"
    assistant_prefix = " "
    assistant_end = " </s>"


class _Cheetah(ChatTemplate):
    """Cheetah's prompts: each image as `<Img><image></Img>`; the system part always written.

    Cheetah writes `<Img><HereForImage></Img>` per image. The default system prompt is "", and
    the first round's `first_user_prefix` is written with it, empty or not.
    """

    default_system = ""
    default_image_text = "<Img>{image}</Img>"
    system_format = ""  # the system prompt goes into the first user turn
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

    def _user_prefix(self, first_round_system: str | None) -> str:
        if first_round_system is None:  # a later round
            return self.user_prefix
        return self.first_user_prefix.format(system=first_round_system)  # "" included


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
    default_bos = "<s>"
    user_prefix = "Human: "
    first_user_prefix = "{system}###Human: "
    user_suffix = " ###"
    assistant_header = "Assistant:"
    assistant_prefix = " "
    assistant_end = "###"
    apart_header = "Assistant: "  # '###Human: {} ###Assistant: ', the space in the prompt


class CheetahLlama2(_Cheetah, Llama2):
    """Cheetah with LLaMA-2-7B-chat: the `<<SYS>>` block always written; trainable: ` {a}</s>`.

    `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a}</s><s>[INST] {q2} [/INST] {a2}</s>`,
    each image as `<Img><image></Img>`; with the default empty system prompt the first turn
    starts `<s>[INST] <<SYS>>\\n\\n<</SYS>>\\n\\n`, Cheetah's `'[INST] <<SYS>>\\n\\n<</SYS>>\\n\\n{}
    [/INST]'` after a BOS, and the answer ends with its end_sym `</s>` (no space before it).
    Llama-2's strings otherwise, with Cheetah's image text and system prompt.
    """

    assistant_end = "</s>"


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
    default_bos = "<s>"
    system_format = "System: {system}<end_of_utterance>\n"
    user_suffix = "<end_of_utterance>\n"
    assistant_header = "Assistant:"
    assistant_prefix = " "
    assistant_end = "<end_of_utterance>"
    assistant_suffix = "\n"

    def _user(self, out: SegmentBuilder, turn: Turn, first_round_system: str | None) -> None:
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

    system_format = ""


class Fuyu(Raw):
    """Fuyu-8B's prompt, as transformers' `FuyuProcessor` writes it; trainable: `{a}|ENDOFTEXT|`.

    The question as written, then `<0x04>` (Fuyu's beginning-of-answer token), then the answer.
    Images come first, each as its patch rows and `<s>` (`FuyuModel` with Fuyu-8B's image text):
    write `<image>` before the question. Fuyu-8B is no chat model: later rounds repeat the form.
    """

    special_tokens = ("<0x04>", "|ENDOFTEXT|")
    user_suffix = "<0x04>"
    assistant_end = "|ENDOFTEXT|"


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


# --- recognising a transformers chat template ---------------------------------------------

# lmm templates a transformers chat template is compared with (`match_chat_template`), in order
KNOWN_FORMATS: tuple[str | dict, ...] = (
    "lmm.data.templates.Llama3",
    "lmm.data.templates.Qwen25",
    "lmm.data.templates.ChatML",
    {"class_path": "lmm.data.templates.ChatML", "init_args": {"system": ""}},
    {"class_path": "lmm.data.templates.VicunaV1", "init_args": {"system": ""}},
    "lmm.data.templates.VicunaV1",
    "lmm.data.templates.Idefics2",
    "lmm.data.templates.Gemma",
    "lmm.data.templates.Llama2",
    "lmm.data.templates.Phi",
)
_PROBE = " What is in the picture?"  # a leading space: no template or processor adds one


def match_chat_template(
    chat_template: str,
    bos_token: str | None = None,
    adds_bos: bool = False,
    eos_token: str | None = None,
) -> dict | None:
    """The lmm template (`{class_path, init_args}`) whose generation prompt equals a transformers
    chat template's (Jinja, as `apply_chat_template` renders it), or None.

    The probe is one user turn, an image then a question, in both content forms transformers
    templates take (a list of parts, a string with `<image>`); each of `KNOWN_FORMATS` renders
    it with its image followed by `\\n` or not. The bos is left out of the comparison: the
    template's `bos` is `bos_token` when the chat template writes it or the tokenizer adds it
    when encoding (`adds_bos`), else none, so the ids equal the transformers processor's.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered: set[str] = set()
    bos = bos_token or ""
    written_bos = False
    contents: list = [[{"type": "image"}, {"type": "text", "text": _PROBE}]]
    contents += [f"{IMAGE_MARKER}\n{_PROBE}", f"{IMAGE_MARKER}{_PROBE}"]
    for content in contents:
        messages = [{"role": "user", "content": content}]
        try:
            (text,), _ = render_jinja_template(
                [messages],
                chat_template=chat_template,
                add_generation_prompt=True,
                bos_token=bos,
                eos_token=eos_token or "",
            )
        except Exception:  # noqa: BLE001 - a template that refuses the probe matches nothing
            continue
        if "{'type'" in text:  # a text-only template printed the parts list
            continue
        if bos and text.startswith(bos):
            text, written_bos = text[len(bos) :], True
        rendered.add(text)
    for spec in KNOWN_FORMATS:
        spec = {"class_path": spec} if isinstance(spec, str) else spec
        args = dict(spec.get("init_args", {}))
        template = build_template(
            {"class_path": spec["class_path"], "init_args": args | {"bos": ""}}
        )
        for parts in ([Media(0), "\n", _PROBE], [Media(0), _PROBE]):
            prompt = render_text(template.render([Turn("user", parts)], add_generation_prompt=True))
            if prompt in rendered:
                args["bos"] = bos if (written_bos or adds_bos) else ""
                return {"class_path": spec["class_path"], "init_args": args}
    return None
