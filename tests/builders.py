"""Tiny random transformers checkpoints the tests import (written with `save_pretrained`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.idefics2.configuration_idefics2 import (
    Idefics2PerceiverConfig,
    Idefics2VisionConfig,
)

from lmm.data.sample import IMAGE_MARKER
from lmm.families.idefics2.convert import END_OF_UTTERANCE
from lmm.families.idefics2.model import FAKE_IMAGE_TOKEN, IDEFICS2_MEAN, IDEFICS2_STD
from lmm.families.qwen2_5_vl.convert import VIDEO_PAD
from lmm.families.qwen2_5_vl.media import VISION_END, VISION_START
from lmm.families.qwen2_5_vl.model import IMAGE_PAD


def build_tiny_idefics2(
    out: str | Path,
    tokenizer: str | Path,
    *,
    vision_hidden: int = 32,
    llm_hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    patch_size: int = 8,
    image_size: int = 32,
    latents: int = 4,
    do_image_splitting: bool = False,
    shortest_edge: int = 16,
    longest_edge: int = 32,
    seed: int = 0,
) -> Path:
    """A tiny random transformers Idefics2 (SigLIP-style tower, perceiver, Mistral) at `out`.

    Saved with `save_pretrained` with its tokenizer (Idefics2's `<fake_token_around_image>`,
    `<image>` and `<end_of_utterance>` added if missing) and an image preprocessor config, as
    published Idefics2 checkpoints are. The perceiver latents are drawn N(0, 1): transformers
    starts them all at one, which makes every latent read the same.
    """
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    vocab = tok.get_vocab()
    new = [t for t in (FAKE_IMAGE_TOKEN, IMAGE_MARKER, END_OF_UTTERANCE) if t not in vocab]
    if new:
        tok.add_special_tokens(
            {"additional_special_tokens": new}, replace_extra_special_tokens=False
        )
    text = MistralConfig(
        vocab_size=len(tok),
        hidden_size=llm_hidden,
        intermediate_size=4 * llm_hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=llm_hidden // heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Idefics2Config(
        vision_config=Idefics2VisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=4 * vision_hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ).to_dict(),
        perceiver_config=Idefics2PerceiverConfig(
            hidden_size=llm_hidden,
            rms_norm_eps=1e-5,
            resampler_n_latents=latents,
            resampler_depth=layers,
            resampler_n_heads=heads,
            resampler_head_dim=llm_hidden // heads,
            num_key_value_heads=max(1, heads // 2),
        ).to_dict(),
        text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_MARKER),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    pre = {
        "image_processor_type": "Idefics2ImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_pad": True,
        "do_image_splitting": do_image_splitting,
        "image_mean": list(IDEFICS2_MEAN),
        "image_std": list(IDEFICS2_STD),
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": shortest_edge, "longest_edge": longest_edge},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    processor = {"processor_class": "Idefics2Processor", "image_seq_len": latents}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def build_tiny_qwen2_5_vl(
    out: str | Path,
    tokenizer: str | Path,
    *,
    vision_hidden: int = 32,
    llm_hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    window_size: int = 56,
    tokens_per_second: int = 2,
    min_pixels: int = 28 * 28,
    max_pixels: int = 112 * 112,
    video_min_pixels: int = 28 * 28,
    video_max_pixels: int = 56 * 56,
    tie_word_embeddings: bool = False,
    rope_theta: float = 100.0,
    initializer_range: float = 0.2,
    seed: int = 0,
) -> Path:
    """A tiny random transformers Qwen2.5-VL at `out`, with its tokenizer and processor configs.

    The tokenizer gets Qwen's media tokens if it lacks them. The ViT has `layers` blocks, the
    last with full attention and the others with windows of `window_size` px (2 × 2 merged
    tokens at the default), so both kinds run and windows of odd grids are padded. A small
    `rope_theta` and large `initializer_range` make attention sharp and position-dependent,
    so that wrong positions show in the logits.
    """
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    new = [t for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD) if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens(
            {"additional_special_tokens": new}, replace_extra_special_tokens=False
        )
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": layers,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": max(1, heads // 2),
            "out_hidden_size": llm_hidden,
            "window_size": window_size,
            "fullatt_block_indexes": [layers - 1],
            "tokens_per_second": tokens_per_second,
            "initializer_range": initializer_range,
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": llm_hidden,
            "intermediate_size": 2 * llm_hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 4096,
            "rope_parameters": _mrope(llm_hidden // heads, rope_theta),
            "initializer_range": initializer_range,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    spec_values = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    video_values = {"min_pixels": video_min_pixels, "max_pixels": video_max_pixels}
    for name, values in (
        ("preprocessor_config.json", spec_values),
        ("video_preprocessor_config.json", video_values),
    ):
        body = {
            **values,
            "size": {"shortest_edge": values["min_pixels"], "longest_edge": values["max_pixels"]},
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
        }
        (out / name).write_text(json.dumps(body, indent=2) + "\n")
    return out


def _mrope(head_dim: int, theta: float) -> dict:
    """M-RoPE sections (temporal, height, width) of `head_dim / 2` frequencies, in Qwen's
    16 : 24 : 24 proportion."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": [t, h, half - t - h]}
