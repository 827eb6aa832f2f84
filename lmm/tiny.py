"""Tiny models and a tokenizer built locally, saved with `save_pretrained` for tests and the quickstart.

They load through the same `from_pretrained` path as a real checkpoint. Nothing here downloads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lmm.data.sample import IMAGE_MARKER
from lmm.data.templates import ChatTemplate

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def template_special_tokens() -> list[str]:
    """Every special token any chat template of lmm uses, in a fixed order."""
    seen: dict[str, None] = {}
    stack = [ChatTemplate]
    while stack:
        cls = stack.pop(0)
        for tok in getattr(cls, "special_tokens", ()):
            seen.setdefault(tok, None)
        stack.extend(sorted(cls.__subclasses__(), key=lambda c: c.__name__))
    return list(seen)


def build_tokenizer(corpus: Iterable[str], out: str | Path, vocab_size: int = 600) -> Path:
    """Train a byte-level BPE on `corpus`; `<image>`, pad and every template token are special."""
    specials = [PAD, UNK, BOS, EOS, IMAGE_MARKER]
    specials += [t for t in template_special_tokens() if t not in specials]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[t for t in specials if t not in (PAD, UNK, BOS, EOS)],
    )
    out = Path(out)
    fast.save_pretrained(out)
    return out


def build_llm(
    out: str | Path,
    tokenizer: str | Path,
    model_type: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    intermediate: int | None = None,
    max_positions: int = 2048,
    vocab_size: int | None = None,
) -> Path:
    """A randomly initialised causal LM of `model_type` (llama, qwen2, phi, gemma, ...) sized to the tokenizer.

    `intermediate` is the MLP width (default 4 × hidden). `vocab_size` gives the embeddings and
    the vocabulary projection more rows than the tokenizer has (a real model's vocabulary cost
    with the tiny tokenizer; the extra rows are never a target); default: the tokenizer's size.
    """
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer)
    if vocab_size is not None and vocab_size < len(tok):
        raise ValueError(f"vocab_size {vocab_size} < the tokenizer's {len(tok)} tokens")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    model.save_pretrained(out)
    return out


def build_vision(
    out: str | Path,
    model_type: str = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """A randomly initialised CLIP or SigLIP vision tower."""
    classes = {
        "clip": (CLIPVisionConfig, CLIPVisionModel),
        "siglip": (SiglipVisionConfig, SiglipVisionModel),
    }
    config_cls, model_cls = classes[model_type]
    config = config_cls(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    out = Path(out)
    model.save_pretrained(out)
    return out


def build_tiny_blip2(
    out: str | Path, llm: str | Path, tokenizer: str | Path, queries: int = 8, seed: int = 0
) -> Path:
    """A tiny transformers BLIP-2 (EVA-style ViT 32 px / patch 8, 2-layer Q-Former, 8 queries)
    around the tiny LLM, saved with `save_pretrained`."""
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer)
    text = AutoModelForCausalLM.from_pretrained(llm)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            initializer_range=0.02,  # the default 1e-10 makes every image look the same
        ),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            cross_attention_frequency=2,
        ),
        text_config=text.config,
        num_query_tokens=queries,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_MARKER),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    model.query_tokens.data.normal_(0.0, 0.02)  # transformers starts them at zero (explodes)
    model.language_model.load_state_dict(text.state_dict())
    out = Path(out)
    model.save_pretrained(out)
    return out


# The quickstart's model (`lmm demo`, benchmarks/synthetic_tasks.py): CLIP 32 px with 4-px
# patches, 64 wide x 2 layers; Llama 128 wide x 4 layers.
QUICKSTART_SIZES = dict(
    image_size=32, patch_size=4, vision_hidden=64, vision_layers=2, llm_hidden=128, llm_layers=4
)


def build_tiny_assets(
    out: str | Path,
    corpus: Iterable[str],
    *,
    llm_type: str = "llama",
    vision_type: str = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> dict[str, Path]:
    """Write `out/tokenizer`, `out/llm` and `out/vision`; return their paths."""
    out = Path(out)
    tokenizer = build_tokenizer(corpus, out / "tokenizer")
    llm = build_llm(out / "llm", tokenizer, llm_type, llm_hidden, llm_layers, heads, seed)
    vision = build_vision(
        out / "vision",
        vision_type,
        image_size,
        patch_size,
        vision_hidden,
        vision_layers,
        heads,
        seed,
    )
    return {"tokenizer": tokenizer, "llm": llm, "vision": vision}
