"""Tiny random transformers checkpoints the tests import (written with `save_pretrained`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPVisionConfig,
    FuyuConfig,
    FuyuForCausalLM,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil
from transformers.models.idefics2.configuration_idefics2 import (
    Idefics2PerceiverConfig,
    Idefics2VisionConfig,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from lmm.components.vision import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from lmm.data.sample import IMAGE_MARKER
from lmm.families.fuyu.model import IMAGE_TOKEN, NEWLINE_TOKEN
from lmm.families.idefics2.convert import END_OF_UTTERANCE
from lmm.families.idefics2.model import FAKE_IMAGE_TOKEN, IDEFICS2_MEAN, IDEFICS2_STD
from lmm.families.qwen2_5_vl.convert import VIDEO_PAD
from lmm.families.qwen2_5_vl.media import VISION_END, VISION_START
from lmm.families.qwen2_5_vl.model import IMAGE_PAD

# The chat templates of the published transformers folders (llava-hf/llava-1.5-7b-hf,
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf, HuggingFaceM4/idefics2-8b), as their processors
# save them.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _text_config(model_type: str, tok, hidden: int = 64, layers: int = 2, heads: int = 4):
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,  # sharper logits than the default 0.02: clear greedy choices
    )


def build_tiny_llava_hf(
    out: str | Path, tokenizer: str | Path, vision: str | Path, seed: int = 0
) -> Path:
    """A tiny random transformers Llava (the CLIP tower at `vision`, 2-layer Llama) at `out`,
    saved as llava-hf's are: model, tokenizer and `LlavaProcessor` (CLIP's resize and centre
    crop, LLaVA-1.5's chat template), by transformers 5's `save_pretrained`."""
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    vision_config = CLIPVisionConfig.from_pretrained(vision)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_config("llama", tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_MARKER),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    side = vision_config.image_size
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out


def build_tiny_onevision_hf(
    out: str | Path,
    tokenizer: str | Path,
    vision: str | Path,
    pinpoints: list[list[int]],
    max_tiles: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny random transformers LLaVA-OneVision (the SigLIP tower at `vision`, 2-layer Qwen2)
    at `out`, with the files llava-hf's OneVision repos have: `preprocessor_config.json`,
    `processor_config.json`, `chat_template.json` and a tokenizer with `<video>`."""
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    if "<video>" not in tok.get_vocab():
        tok.add_special_tokens(
            {"extra_special_tokens": ["<video>"]}, replace_extra_special_tokens=False
        )
    vision_config = AutoConfig.from_pretrained(vision)
    config = LlavaOnevisionConfig(
        vision_config=vision_config.to_dict(),
        text_config=_text_config("qwen2", tok).to_dict(),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_MARKER),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():  # transformers draws it N(0, 1/width); make it stand out
        model.model.image_newline.normal_()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    side = vision_config.image_size
    LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
    ).save_pretrained(out)
    grid = side // vision_config.patch_size
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "image_token": IMAGE_MARKER,
        "video_token": "<video>",
        "num_image_tokens": grid * grid,
        "vision_aspect_ratio": f"anyres_max_{max_tiles}",
        "vision_feature_select_strategy": "full",
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    template = {"chat_template": ONEVISION_CHAT_TEMPLATE}
    (out / "chat_template.json").write_text(json.dumps(template, indent=2) + "\n")
    return out


FUYU_CANVAS, FUYU_PATCH = (24, 32), 4  # (height, width) images are fitted into; patch side


def fuyu_image_processor() -> FuyuImageProcessorPil:
    return FuyuImageProcessorPil(
        size={"height": FUYU_CANVAS[0], "width": FUYU_CANVAS[1]},
        patch_size={"height": FUYU_PATCH, "width": FUYU_PATCH},
    )


def build_tiny_fuyu(out: str | Path, tokenizer: str | Path, seed: int = 0) -> FuyuForCausalLM:
    """A tiny transformers Fuyu (2-layer Persimmon, width 32, 4-px patches) saved as published,
    with its tokenizer and image processor; `tokenizer` must have `|SPEAKER|` and `|NEWLINE|`."""
    tok = AutoTokenizer.from_pretrained(tokenizer)
    text = dict(
        model_type="persimmon",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = FuyuConfig(
        text_config=text,
        patch_size=FUYU_PATCH,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    hf = FuyuForCausalLM(config).eval()
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    fuyu_image_processor().save_pretrained(out)
    return hf


def build_fuyu_tokenizer(tokenizer: str | Path, out: str | Path) -> Path:
    """The tokenizer with Fuyu's `|SPEAKER|` and `|NEWLINE|` (Mantis's tokens left out), at `out`."""
    tok = AutoTokenizer.from_pretrained(tokenizer)
    tok.add_special_tokens(
        {"extra_special_tokens": [IMAGE_TOKEN, NEWLINE_TOKEN]}, replace_extra_special_tokens=False
    )
    tok.save_pretrained(out)
    return Path(out)


def fuyu_hf_inputs(
    paths: list[Path], image_processor: FuyuImageProcessorPil | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' padded canvases `[N, 3, H, W]` and each image's patches, as FuyuProcessor
    builds them (`_process_images`: crop to the patches covering the unpadded image, patchify).

    FuyuProcessor itself needs torchvision here (its PIL path hands torch tensors to a numpy
    patchify), so its steps are taken one by one with the PIL image processor.
    """
    ip = image_processor or fuyu_image_processor()
    height, width = ip.size["height"], ip.size["width"]
    patch = ip.patch_size["height"]
    out = ip([Image.open(p).convert("RGB") for p in paths])
    canvases, patches = [], []
    for i, (canvas,) in enumerate(out["images"]):
        new_h = min(height, math.ceil(out["image_unpadded_heights"][i][0] / patch) * patch)
        new_w = min(width, math.ceil(out["image_unpadded_widths"][i][0] / patch) * patch)
        canvases.append(torch.from_numpy(canvas))
        patches.append(torch.from_numpy(ip.patchify_image(canvas[:, :new_h, :new_w])))
    return torch.stack(canvases), patches


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
    chat_template: str | None = None,
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
    if chat_template is not None:
        template = {"chat_template": chat_template}
        (out / "chat_template.json").write_text(json.dumps(template, indent=2) + "\n")
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
