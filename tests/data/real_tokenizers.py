"""Real tokenizers built offline from files that PyPI packages ship (dev extra): Llama-3, Mistral-7B v1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# Llama-3's pre-tokenizer split regex (llama_models/llama3/tokenizer.py, `Tokenizer.pat_str`).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_BASE_TOKENS = 128_000


def llama3_special_tokens() -> list[str]:
    """Llama-3's 256 special tokens in id order (ids 128000...128255), as llama_models lists them."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]
    return named + reserved


def build_llama3_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The Llama-3 tokenizer (tiktoken BPE of `llama_models`), converted and saved to `folder`."""
    import llama_models

    model_file = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    specials = llama3_special_tokens()
    converter = TikTokenConverter(
        vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_mistral_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The Mistral-7B v1 SentencePiece tokenizer of `mistral_common`, loaded from `folder`."""
    import mistral_common

    folder.mkdir(parents=True, exist_ok=True)
    model_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(model_file, folder / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> None:
    """Add the `tokens` the tokenizer lacks as special tokens, as a user would."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
