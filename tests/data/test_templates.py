"""Chat templates render the exact published formats, and their segments tokenize like the whole text."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmm.data.sample import Media, Turn
from lmm.data.templates import (
    ChatML,
    ChatTemplate,
    CheetahLlama2,
    CheetahVicuna,
    Gemma,
    Llama2,
    Llama3,
    Phi,
    Plain,
    Qwen25,
    Segment,
    VicunaV1,
    build_template,
    match_chat_template,
    render_text,
    trainable_text,
)
from lmm.data.tokenization import SegmentTokenizer
from tests.builders import IDEFICS2_CHAT_TEMPLATE, LLAVA_CHAT_TEMPLATE, ONEVISION_CHAT_TEMPLATE
from tests.data.real_tokenizers import (
    add_special_tokens,
    build_llama3_tokenizer,
    build_mistral_tokenizer,
)

TEMPLATES: list[type[ChatTemplate]] = [
    Plain,
    Llama3,
    ChatML,
    Qwen25,
    Phi,
    VicunaV1,
    Gemma,
    Llama2,
    CheetahVicuna,
    CheetahLlama2,
]
TOKENIZERS = ["tiny_bpe", "llama3_tokenizer", "mistral_tokenizer"]

TWO_ROUNDS = [
    Turn("user", [Media(0), "\nWhat colour is the square?"]),
    Turn("assistant", ["red"]),
    Turn("user", ["And the shape?"]),
    Turn("assistant", ["a square"]),
]
SYSTEM_PROMPT = [
    Turn("system", ["Be brief."]),
    Turn("user", [Media(0), "\nWhat colour is the square?"]),
]

LLAVA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

# template: (rendered text, trainable text) of TWO_ROUNDS, written out by hand.
EXPECTED_TWO_ROUNDS: dict[type[ChatTemplate], tuple[str, str]] = {
    Plain: ("<image>red\na square\n", "red\na square\n"),
    Llama3: (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the shape?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na square<|eot_id|>",
        "red<|eot_id|>a square<|eot_id|>",
    ),
    ChatML: (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the square?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nAnd the shape?<|im_end|>\n"
        "<|im_start|>assistant\na square<|im_end|>\n",
        "red<|im_end|>a square<|im_end|>",
    ),
    Qwen25: (
        "<|im_start|>system\n"
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the square?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nAnd the shape?<|im_end|>\n"
        "<|im_start|>assistant\na square<|im_end|>\n",
        "red<|im_end|>a square<|im_end|>",
    ),
    Phi: (
        LLAVA_SYS + " USER: <image>\nWhat colour is the square? ASSISTANT: red<|endoftext|>"
        "USER: And the shape? ASSISTANT: a square<|endoftext|>",
        " red<|endoftext|> a square<|endoftext|>",
    ),
    VicunaV1: (
        "<s>" + LLAVA_SYS + " USER: <image>\nWhat colour is the square? ASSISTANT: red</s>"
        "USER: And the shape? ASSISTANT: a square</s>",
        " red</s> a square</s>",
    ),
    Gemma: (
        "<bos><start_of_turn>user\n<image>\nWhat colour is the square?<end_of_turn>\n"
        "<start_of_turn>model\nred<end_of_turn>\n"
        "<start_of_turn>user\nAnd the shape?<end_of_turn>\n"
        "<start_of_turn>model\na square<end_of_turn>\n",
        "red<end_of_turn>a square<end_of_turn>",
    ),
    Llama2: (
        "<s>[INST] <image>\nWhat colour is the square? [/INST] red </s>"
        "<s>[INST] And the shape? [/INST] a square </s>",
        " red </s> a square </s>",
    ),
    CheetahVicuna: (
        "<s>###Human: <Img><image></Img>\nWhat colour is the square? ###Assistant: red###"
        "Human: And the shape? ###Assistant: a square###",
        " red### a square###",
    ),
    CheetahLlama2: (
        "<s>[INST] <<SYS>>\n\n<</SYS>>\n\n<Img><image></Img>\nWhat colour is the square? [/INST]"
        " red</s><s>[INST] And the shape? [/INST] a square</s>",
        " red</s> a square</s>",
    ),
}

# template: rendered SYSTEM_PROMPT with add_generation_prompt=True, written out by hand.
EXPECTED_SYSTEM_PROMPT: dict[type[ChatTemplate], str] = {
    Plain: "<image>",
    Llama3: "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the square?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ChatML: "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat colour is the square?<|im_end|>\n<|im_start|>assistant\n",
    Qwen25: "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat colour is the square?<|im_end|>\n<|im_start|>assistant\n",
    Phi: "Be brief. USER: <image>\nWhat colour is the square? ASSISTANT:",
    VicunaV1: "<s>Be brief. USER: <image>\nWhat colour is the square? ASSISTANT:",
    Gemma: "<bos><start_of_turn>user\nBe brief.\n\n<image>\nWhat colour is the square?<end_of_turn>\n"
    "<start_of_turn>model\n",
    Llama2: "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat colour is the square? [/INST]",
    CheetahVicuna: "<s>Be brief.###Human: <Img><image></Img>\nWhat colour is the square? "
    "###Assistant:",
    CheetahLlama2: "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<Img><image></Img>\n"
    "What colour is the square? [/INST]",
}

# Harder text for the tokenizers: several images, digits, punctuation, newlines, a quote.
HARD = [
    Turn("system", ["You count things."]),
    Turn("user", ["Compare ", Media(0), " and ", Media(1), ":\nhow many dots (1-10)?"]),
    Turn("assistant", ['3 and 12.\n- left: 3\n- right: 12 (it\'s "many")!']),
    Turn("user", [Media(2), "Why?"]),
    Turn("assistant", ["Because I counted."]),
]


def all_special_tokens() -> list[str]:
    tokens = [t for template in TEMPLATES for t in template.special_tokens]
    return list(dict.fromkeys([*tokens, "<image>", "<pad>"]))


# tokenizers -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bpe() -> PreTrainedTokenizerFast:
    r"""A byte-level BPE trained here on a few sentences, with every template's special tokens.

    GPT-2's split regex; the corpus has no blank line, so no "\n\n" token (with one, GPT-2's
    `\s+(?!\S)` splits Llama3's "\n\n" header from the answer differently: see SegmentTokenizer).
    """
    corpus = [
        "What colour is the square? The square is red.",
        "A chat between a curious user and an artificial intelligence assistant.",
        "USER: describe the image ASSISTANT: a red square and a blue circle",
        "system user assistant model [INST] [/INST] <<SYS>> Be brief. You count things.",
        "And the shape? Compare the two images: how many dots (1-10)? 3 and 12.",
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=all_special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    tokenizer = build_llama3_tokenizer(tmp_path_factory.mktemp("llama3"))
    assert len(tokenizer) == 128_256
    assert tokenizer.convert_tokens_to_ids("<|begin_of_text|>") == 128_000
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128_009
    assert tokenizer.convert_tokens_to_ids("<|reserved_special_token_245|>") == 128_255
    add_special_tokens(tokenizer, all_special_tokens())
    return tokenizer


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    tokenizer = build_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    assert len(tokenizer) == 32_000
    assert tokenizer("red", add_special_tokens=False).input_ids == [2760]  # "▁red"
    add_special_tokens(tokenizer, all_special_tokens())
    return tokenizer


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(request.param)


# rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("template_cls", TEMPLATES)
def test_two_rounds_render_exactly(template_cls: type[ChatTemplate]) -> None:
    segments = template_cls().render(TWO_ROUNDS)
    text, trainable = EXPECTED_TWO_ROUNDS[template_cls]
    assert render_text(segments) == text
    assert trainable_text(segments) == trainable
    assert [s.media for s in segments if s.media is not None] == [0]
    assert not any("<image>" in s.text for s in segments)


@pytest.mark.parametrize("template_cls", TEMPLATES)
def test_system_turn_and_generation_prompt(template_cls: type[ChatTemplate]) -> None:
    segments = template_cls().render(SYSTEM_PROMPT, add_generation_prompt=True)
    assert render_text(segments) == EXPECTED_SYSTEM_PROMPT[template_cls]
    assert trainable_text(segments) == ""
    # the constructor's system prompt renders like a system turn
    user_only = SYSTEM_PROMPT[1:]
    with_arg = template_cls(system="Be brief.").render(user_only, add_generation_prompt=True)
    assert render_text(with_arg) == EXPECTED_SYSTEM_PROMPT[template_cls]


def test_empty_system_prompt_renders_no_system_block() -> None:
    segments = ChatML(system="").render(TWO_ROUNDS[:2])
    assert render_text(segments) == (
        "<|im_start|>user\n<image>\nWhat colour is the square?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )


# Cheetah's own format strings (DCDmllm/Cheetah eval_configs, conversation.py): the training
# text is BOS + `prompt_template.format(question)` + `answer + end_sym`, the chat prompt (Vicuna's
# `CONV_VISION`, sep `###`) ends with `###Assistant:`. `<HereForImage>` is lmm's <image>.
CHEETAH_QUESTION = "<Img><image></Img> <Img><image></Img> What do these pictures show?"
CHEETAH_ANSWER = "A wall over the years."
CHEETAH_TURNS = [
    Turn("user", [Media(0), " ", Media(1), " What do these pictures show?"]),
    Turn("assistant", [CHEETAH_ANSWER]),
]


@pytest.mark.parametrize(
    ("template_cls", "prompt_template", "end_sym", "answer_space"),
    [
        (CheetahVicuna, "###Human: {} ###Assistant: ", "###", ""),
        # the answer is tokenized apart from the prompt: SentencePiece puts `▁` in front of it
        (CheetahLlama2, "[INST] <<SYS>>\n\n<</SYS>>\n\n{} [/INST]", "</s>", " "),
    ],
)
def test_cheetah_prompts_are_cheetahs(
    template_cls: type[ChatTemplate], prompt_template: str, end_sym: str, answer_space: str
) -> None:
    prompt = prompt_template.format(CHEETAH_QUESTION)
    segments = template_cls().render(CHEETAH_TURNS)
    assert render_text(segments) == "<s>" + prompt + answer_space + CHEETAH_ANSWER + end_sym
    assert trainable_text(segments) == " " + CHEETAH_ANSWER + end_sym
    assert [s.media for s in segments if s.media is not None] == [0, 1]
    generation = template_cls().render(CHEETAH_TURNS[:1], add_generation_prompt=True)
    assert render_text(generation) == "<s>" + prompt.rstrip(" ")
    assert template_cls.stop_strings == (end_sym,)


def test_trainable_segments_are_answers_and_terminators() -> None:
    segments = Phi(system="").render(TWO_ROUNDS[:2])
    assert segments == [
        Segment("USER: "),
        Segment(media=0),
        Segment("\nWhat colour is the square? ASSISTANT:"),
        Segment(" red<|endoftext|>", trainable=True),
    ]


# tokenization -----------------------------------------------------------------------------


@pytest.mark.parametrize("template_cls", TEMPLATES)
@pytest.mark.parametrize(
    ("turns", "add_generation_prompt"),
    [(TWO_ROUNDS, False), (SYSTEM_PROMPT, True), (HARD, False)],
    ids=["two_rounds", "system_prompt", "hard"],
)
def test_segment_tokens_equal_whole_text_tokens(
    tokenizer: PreTrainedTokenizerBase,
    template_cls: type[ChatTemplate],
    turns: list[Turn],
    add_generation_prompt: bool,
) -> None:
    segments = template_cls().render(turns, add_generation_prompt=add_generation_prompt)
    input_ids, labels = SegmentTokenizer(tokenizer).encode(segments)
    whole = tokenizer(render_text(segments), add_special_tokens=False).input_ids
    assert input_ids == whole, (
        tokenizer.convert_ids_to_tokens(input_ids),
        tokenizer.convert_ids_to_tokens(whole),
    )
    assert len(labels) == len(input_ids)
    trained = [i for i, label in zip(input_ids, labels, strict=True) if label != -100]
    assert trained == [label for label in labels if label != -100]
    # Decoded behind the image token: SentencePiece decoders drop the leading space of a
    # string's first token, which is in the middle of the text here.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    decoded = tokenizer.decode([image_id, *trained], clean_up_tokenization_spaces=False)
    assert decoded == "<image>" + trainable_text(segments)
    n_media = sum(s.media is not None for s in segments)
    assert input_ids.count(image_id) == n_media
    assert all(label != image_id for label in labels)


@pytest.mark.parametrize("template_cls", [Llama3, ChatML, Qwen25, Gemma])
def test_leading_newlines_of_an_answer_join_the_header(
    llama3_tokenizer: PreTrainedTokenizerBase, template_cls: type[ChatTemplate]
) -> None:
    # Llama-3 (and Qwen2) split "\n\n" + "\nred" as "\n\n\n", "red": no token boundary
    # between header and answer unless the answer's leading newlines move to the header.
    turns = [Turn("user", ["What colour?"]), Turn("assistant", ["\n \nred"])]
    segments = template_cls().render(turns)
    assert "\n \nred" in render_text(segments)
    assert trainable_text(segments).startswith("red")
    input_ids, _ = SegmentTokenizer(llama3_tokenizer).encode(segments)
    whole = llama3_tokenizer(render_text(segments), add_special_tokens=False).input_ids
    assert input_ids == whole


def test_special_tokens_are_single_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    for token in all_special_tokens():
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token


def test_missing_image_token_says_how_to_add_it() -> None:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["a red square"], trainer)
    with pytest.raises(ValueError, match="add_special_tokens"):
        SegmentTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend))


def test_image_marker_in_text_is_an_error(tiny_bpe: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="Media"):
        SegmentTokenizer(tiny_bpe).encode([Segment("look: <image>")])


# errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("template_cls", TEMPLATES)
def test_assistant_first_is_an_error(template_cls: type[ChatTemplate]) -> None:
    turns = [Turn("assistant", ["red"]), Turn("user", ["What colour?"])]
    with pytest.raises(ValueError, match="turn 0 is 'assistant' but 'user' was expected"):
        template_cls().render(turns)


@pytest.mark.parametrize("template_cls", TEMPLATES)
def test_unknown_role_is_an_error(template_cls: type[ChatTemplate]) -> None:
    turns = [Turn("user", ["What colour?"]), Turn("bot", ["red"])]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="turn 1 has unknown role 'bot'"):
        template_cls().render(turns)


def test_two_user_turns_in_a_row_is_an_error() -> None:
    turns = [Turn("user", ["Hi"]), Turn("user", ["What colour?"]), Turn("assistant", ["red"])]
    with pytest.raises(ValueError, match="turn 1 is 'user' but 'assistant' was expected"):
        Llama3().render(turns)


def test_generation_prompt_needs_a_final_user_turn() -> None:
    with pytest.raises(ValueError, match="end with a user turn"):
        Llama3().render(TWO_ROUNDS, add_generation_prompt=True)
    with pytest.raises(ValueError, match="add_generation_prompt=True"):
        Llama3().render(TWO_ROUNDS[:3])


def test_media_in_system_turn_is_an_error() -> None:
    turns = [Turn("system", [Media(0)]), *TWO_ROUNDS]
    with pytest.raises(ValueError, match="system turn holds media"):
        ChatML().render(turns)


# transformers chat templates as published (Llama-3-8B-Instruct, Qwen2.5-Instruct), besides the
# llava-hf / idefics2 ones of tests/builders.py
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
QWEN25_JINJA = (
    "{%- for message in messages %}{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}{{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    ("jinja", "bos", "adds_bos", "expected"),
    [
        (LLAVA_CHAT_TEMPLATE, "<s>", True, ("VicunaV1", {"system": "", "bos": "<s>"})),
        (LLAVA_CHAT_TEMPLATE, "<s>", False, ("VicunaV1", {"system": "", "bos": ""})),
        (ONEVISION_CHAT_TEMPLATE, None, False, ("ChatML", {"system": "", "bos": ""})),
        (IDEFICS2_CHAT_TEMPLATE, "<s>", True, ("Idefics2", {"bos": "<s>"})),
        (LLAMA3_JINJA, "<|begin_of_text|>", False, ("Llama3", {"bos": "<|begin_of_text|>"})),
        (QWEN25_JINJA, None, False, ("Qwen25", {"bos": ""})),
        ("{% for m in messages %}<<{{ m['role'] }}>>{% endfor %}", "<s>", True, None),
    ],
    ids=["llava15", "llava15-no-bos", "onevision", "idefics2", "llama3", "qwen25", "unknown"],
)
def test_match_chat_template(jinja, bos, adds_bos, expected):
    """A transformers chat template is recognised as the lmm template with its generation prompt."""
    found = match_chat_template(jinja, bos, adds_bos, "</s>")
    if expected is None:
        assert found is None
        return
    name, args = expected
    assert found == {"class_path": f"lmm.data.templates.{name}", "init_args": args}
    assert build_template(found).bos == args["bos"]  # a template lmm builds
