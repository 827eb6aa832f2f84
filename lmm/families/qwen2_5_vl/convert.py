"""Qwen2.5-VL checkpoints: import a transformers folder into lmm's layout, export one back.

`import_checkpoint` reads a transformers `Qwen2_5_VLForConditionalGeneration` folder or hub id
(either key layout: transformers 5's `model.visual.*` / `model.language_model.*` / `lm_head.*`
or the older `visual.*` / `model.*` / `lm_head.*`) and writes `config.json`, the processor
configs, `tokenizer/`, `model.safetensors` (the weights under `LMMModule`'s names:
`model.vision.*`, `model.connector.*`, `model.llm.model.*`) and `lmm.yaml`, a recipe whose
model builds from the config and takes the weights by `init_from`. `export_hf` writes a
transformers folder of a `Qwen25VLModel`. `build_tiny_checkpoint` writes a tiny random one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lmm.data.tokenization import checkpoint_tokenizer
from lmm.families.qwen2_5_vl.media import VISION_END, VISION_START
from lmm.families.qwen2_5_vl.model import IMAGE_PAD, Qwen25VLModel
from lmm.families.registry import component, import_recipe
from lmm.training.checkpoint import save_safetensors
from lmm.utils.logging import get_logger

log = get_logger(__name__)

VIDEO_PAD = "<|video_pad|>"
TEMPLATE = "lmm.data.templates.ChatML"  # Qwen2.5-VL's chat format and default system prompt
WEIGHTS = "model.safetensors"


def import_checkpoint(
    src: str | Path, out: str | Path, tokenizer: str | Path | None = None
) -> Path:
    """Write lmm's layout of a transformers Qwen2.5-VL checkpoint to `out`; return `out/lmm.yaml`.

    `src` is a folder or a hub id; `tokenizer` defaults to it.
    """
    where, out = str(src), Path(out)
    model = Qwen25VLModel(where, dtype=_dtype_name(where))
    tok = _tokenizer(tokenizer or where, model.config)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    write_processor_configs(model, out)
    tok.save_pretrained(out / "tokenizer")
    state = {f"model.{k}": v for k, v in _unshared(model.state_dict()).items()}
    save_safetensors(state, out / WEIGHTS)  # with hashes, checked by init_from
    recipe = out / "lmm.yaml"
    recipe.write_text(_recipe(where, out, _dtype_name(where)))
    log.info("imported %s (transformers Qwen2.5-VL) into %s", where, out)
    return recipe


def export_hf(module, out: str | Path) -> Path:
    """Write a module's `Qwen25VLModel` as a transformers Qwen2.5-VL folder (`save_pretrained`)
    with its processor configs; returns `out`."""
    model: Qwen25VLModel = module.model
    out = Path(out)
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(model.config)
    visual = hf.model.visual
    visual.patch_embed = model.vision.patch_embed
    visual.rotary_pos_emb = model.vision.rotary_pos_emb
    visual.blocks = model.vision.blocks
    visual.merger = model.connector
    hf.model.language_model = model.llm.model.model
    hf.lm_head = model.llm.model.lm_head
    meta = [n for n, p in hf.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"export_hf: parameters left unset: {meta[:4]}")
    hf.save_pretrained(out)
    write_processor_configs(model, out)
    return out


def write_processor_configs(model: Qwen25VLModel, out: Path) -> None:
    """preprocessor_config.json and video_preprocessor_config.json of the model's media spec."""
    spec = model.media_spec()
    common = {
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.merge_size,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "do_rescale": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 3,
    }
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        **common,
    }
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "min_pixels": spec.video_min_pixels,
        "max_pixels": spec.video_max_pixels,
        "size": {"shortest_edge": spec.video_min_pixels, "longest_edge": spec.video_max_pixels},
        **common,
    }
    for name, body in (
        ("preprocessor_config.json", image),
        ("video_preprocessor_config.json", video),
    ):
        (out / name).write_text(json.dumps(body, indent=2) + "\n")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without a tied head (safetensors stores no shared tensors)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        key = v.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def _dtype_name(where: str) -> str:
    dtype = Qwen2_5_VLConfig.from_pretrained(where).text_config.dtype
    name = str(dtype or "float32").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _tokenizer(name: str | Path, config: Qwen2_5_VLConfig):
    """The checkpoint's tokenizer, checked against the config's media token ids."""
    tok = checkpoint_tokenizer(name, IMAGE_PAD)
    expected = {
        IMAGE_PAD: config.image_token_id,
        VIDEO_PAD: config.video_token_id,
        VISION_START: config.vision_start_token_id,
        VISION_END: config.vision_end_token_id,
    }
    vocab = tok.get_vocab()
    wrong = {t: (vocab.get(t), i) for t, i in expected.items() if vocab.get(t) != i}
    if wrong:
        raise ValueError(
            f"{name}: tokenizer ids (got, config.json) differ for {wrong}; pass the "
            "checkpoint's own tokenizer"
        )
    return tok


def _recipe(src: str, out: Path, dtype: str) -> str:
    """A recipe (model + data template) that builds the imported model with its weights."""
    model = component(
        "lmm.families.qwen2_5_vl.Qwen25VLModel",
        path=str(out.resolve()),
        weights=False,
        dtype=dtype,
    )
    header = [
        f"Imported from {src} (transformers Qwen2.5-VL) by lmm.families.qwen2_5_vl.convert.",
        "config.json and the processor configs build the model; model.safetensors holds its",
        "weights under lmm's names (init_from).",
    ]
    return import_recipe(
        header,
        model,
        str((out / "tokenizer").resolve()),
        TEMPLATE,
        stop_strings=["<|im_end|>"],
        init_from=str((out / WEIGHTS).resolve()),
    )
