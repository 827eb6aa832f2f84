"""Reading the published LLaVA layouts (Mantis / transformers Llava, transformers OneVision,
LLaVA-NeXT / OneVision as MAmmoTH-VL, Mipha): checkpoint files, key layouts, tower and LLM
configs → a `Source` that `convert` writes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from torch import Tensor, nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lmm.families.hf import processor_configs
from lmm.utils.logging import get_logger

log = get_logger(__name__)

Layout = Literal["mantis", "onevision", "llava_qwen", "mipha"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

VISION_CLASSES = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
}

# The LLM of a LLaVA-style checkpoint is the base causal LM with extra config fields.
TEXT_MODEL_TYPES = {
    "llava_qwen": "qwen2",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_mixtral": "mixtral",
    "llava_gemma": "gemma",
    "llava_phi": "phi",
    "mipha_phi": "phi",
    "mipha_gemma": "gemma",
    "mipha_phi3": "phi3",
}

# Vision towers LLaVA-NeXT checkpoints name by hub id. Used only when the tower's own config
# cannot be read (offline, not cached) and no `vision_config` is given; the geometry (width,
# depth, patch, image size) is always re-read from the weights.
KNOWN_TOWERS: dict[str, dict] = {
    "google/siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model",
        num_attention_heads=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model",
        num_attention_heads=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "openai/clip-vit-large-patch14": dict(
        model_type="clip_vision_model",
        num_attention_heads=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}

# Config fields of LLaVA-style checkpoints that are not the LLM's (`mm_*` are dropped too).
_NOT_TEXT = {
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "_name_or_path",
    "vision_config",
    "vision_tower",
    "vision_tower_pretrained",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_crop_resolution",
    "image_split_resolution",
    "image_token_index",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "pos_skipping_range",
    "add_faster_video",
    "faster_token_stride",
    "force_sample",
    "add_time_instruction",
}

# Keys some checkpoints carry that current transformers recomputes (dropped on import).


# --- reading checkpoints -------------------------------------------------------------------


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected the checkpoint's {path.name}")
    return json.loads(path.read_text())


def check_keys(
    model: nn.Module, state: dict[str, Tensor], where: str, tied_head: bool = False
) -> None:
    """Raise if `state` lacks a key `model` needs or has one it does not know."""
    expected = set(model.state_dict())
    missing = expected - set(state)
    if tied_head:
        missing = {k for k in missing if not k.endswith("lm_head.weight")}
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not fit the model: {len(missing)} missing "
            f"{sorted(missing)[:6]}, {len(unexpected)} unexpected {sorted(unexpected)[:6]}"
        )


# --- import: published layouts → lmm --------------------------------------------------------


@dataclass
class Source:
    """What a layout reader found: the three parts' weights and how to rebuild them."""

    vision: dict[str, Tensor]  # keys `vision_model.*` (published CLIP/SigLIP layout)
    connector: dict[str, Tensor]  # keys of MLPConnector (`linear_i.*`) or LinearConnector
    llm: dict[str, Tensor]  # keys `model.*`, `lm_head.*`
    vision_kind: str  # clip | siglip
    vision_config: dict  # fields of CLIPVisionConfig / SiglipVisionConfig
    feature_layer: int
    select: str  # default | full
    depth: int  # MLP depth; 0 = LinearConnector
    text_config: PretrainedConfig
    image_aspect: str
    image_token_index: int | None = None  # the checkpoint's <image> id, where it has one
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. image_newline
    model_args: dict = field(default_factory=dict)  # more LlavaModel init_args (e.g. anyres)


# Key prefix → (part, new prefix), first match wins, per layout: how `_split` cuts a state dict.
SPLIT_RULES: dict[str, list[tuple[str, str, str]]] = {
    "mantis": [
        ("model.vision_tower.", "vision", ""),  # transformers ≥ 4.52 writes these
        ("model.multi_modal_projector.", "connector", ""),
        ("model.language_model.", "llm", "model."),
        ("vision_tower.", "vision", ""),  # Mantis (transformers < 4.52)
        ("multi_modal_projector.", "connector", ""),
        ("language_model.model.", "llm", "model."),
        ("language_model.lm_head.", "llm", "lm_head."),
        ("lm_head.", "llm", "lm_head."),
    ],
    "onevision": [
        ("model.vision_tower.", "vision", ""),  # transformers ≥ 4.52 writes these
        ("model.multi_modal_projector.", "connector", ""),
        ("model.image_newline", "extra", "image_newline"),
        ("model.language_model.", "llm", "model."),
        ("vision_tower.", "vision", ""),  # the llava-hf layout (save_pretrained's, too)
        ("multi_modal_projector.", "connector", ""),
        ("image_newline", "extra", "image_newline"),
        ("language_model.model.", "llm", "model."),
        ("language_model.lm_head.", "llm", "lm_head."),
        ("lm_head.", "llm", "lm_head."),
    ],
    "llava_qwen": [
        ("model.vision_tower.vision_tower.", "vision", ""),
        ("model.mm_projector.", "connector", ""),
        ("model.image_newline", "extra", "image_newline"),
        ("model.", "llm", "model."),
        ("lm_head.", "llm", "lm_head."),
    ],
    "mipha": [
        ("model.vision_tower.", "vision", ""),
        ("model.mm_projector.", "connector", ""),
        ("model.", "llm", "model."),
        ("lm_head.", "llm", "lm_head."),
    ],
}


def _split(
    state: dict[str, Tensor], rules: Sequence[tuple[str, str, str]], where: str
) -> dict[str, dict[str, Tensor]]:
    """Sort keys into parts by the first rule (source prefix, part, new prefix) that matches."""
    parts: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        for prefix, part, new in rules:
            if key.startswith(prefix):
                parts.setdefault(part, {})[new + key[len(prefix) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} keys fit no part of the layout, e.g. {sorted(unknown)[:6]}; "
            f"known prefixes: {[r[0] for r in rules]}. Is --layout right?"
        )
    for part in ("vision", "connector", "llm"):
        if part not in parts:
            raise ValueError(
                f"{where}: no {part} weights (prefixes {[r[0] for r in rules if r[1] == part]})"
            )
    return parts


def _projector(weights: dict[str, Tensor], kind: str, where: str) -> tuple[dict, int]:
    """LLaVA `mm_projector` (`nn.Sequential`) weights → connector keys, and the MLP depth."""
    if kind == "linear":
        return {f"linear.{k}": v for k, v in weights.items()}, 0
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match:
        raise ValueError(
            f"{where}: mm_projector_type {kind!r} is not supported; lmm maps 'linear' and "
            "'mlp<N>x_gelu'"
        )
    out = {}
    for key, value in weights.items():
        index, rest = key.split(".", 1)
        if int(index) % 2:
            raise ValueError(f"{where}: projector key {key!r}: odd Sequential index is not Linear")
        out[f"linear_{int(index) // 2 + 1}.{rest}"] = value
    return out, int(match.group(1))


def read_mantis(src: Path, config: dict, state: dict, vision_config) -> Source:
    where = str(src)
    if config.get("model_type") != "llava":
        raise ValueError(f"{where}: model_type {config.get('model_type')!r}, expected 'llava'")
    source = _read_hf_llava(src, config, state, "mantis")
    pre, _ = processor_configs(src)
    # no image processor: CLIP's (LLaVA-1.5) resize and centre crop
    crop = pre.get("do_center_crop", not pre)
    source.image_aspect = "pad" if pre.get("do_pad") else "crop" if crop else "resize"
    return source


def read_onevision(src: Path, config: dict, state: dict, vision_config) -> Source:
    """A transformers `LlavaOnevisionForConditionalGeneration` folder: Llava's parts plus the
    newline, anyres from `image_grid_pinpoints` and `vision_aspect_ratio` (anyres_max_N);
    videos pooled by 2 with one newline after each, as transformers does."""
    where = str(src)
    if config.get("model_type") != "llava_onevision":
        raise ValueError(
            f"{where}: model_type {config.get('model_type')!r}, expected 'llava_onevision'"
        )
    source = _read_hf_llava(src, config, state, "onevision")
    if "image_newline" not in source.extra:
        raise ValueError(f"{where}: the weights have no image_newline; not a OneVision checkpoint")
    aspect = str(config.get("vision_aspect_ratio", "anyres_max_9"))
    match = re.fullmatch(r"anyres_max_(\d+)", aspect)
    if match is None:
        raise ValueError(
            f"{where}: vision_aspect_ratio {aspect!r}; transformers' OneVision reads "
            "anyres_max_<N> only"
        )
    pinpoints = config.get("image_grid_pinpoints")
    if not pinpoints:
        raise ValueError(f"{where}: config.json has no image_grid_pinpoints")
    source.model_args = {
        "anyres": {
            "class_path": "lmm.components.anyres.Anyres",
            "init_args": {
                "grid_pinpoints": [list(p) for p in pinpoints],
                "max_tiles": int(match.group(1)),
                "video_stride": 2,  # transformers' apply_pooling
                "video_newline": "one_token",
            },
        }
    }
    return source


def _read_hf_llava(src: Path, config: dict, state: dict, layout: str) -> Source:
    """The parts of a transformers Llava or OneVision checkpoint (either key layout)."""
    where = str(src)
    parts = _split(state, SPLIT_RULES[layout], where)
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{where}: projector_hidden_act {act!r}; MLPConnector uses gelu")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"{where}: vision_feature_layer {layer!r}; lmm takes one layer (an int)")
    vcfg = dict(config["vision_config"])
    kind = _tower_kind(vcfg.get("model_type", ""), where)
    if vcfg.get("model_type") in ("clip", "siglip"):  # a full CLIP/SigLIP config
        vcfg = dict(vcfg.get("vision_config", {}))
    vision = parts["vision"]
    if any(k.startswith("vision_model.") for k in vision):
        vision = {k: v for k, v in vision.items() if k.startswith("vision_model.")}  # no text tower
    else:  # transformers 5 saves the tower without its `vision_model.` prefix
        vision = {f"vision_model.{k}": v for k, v in vision.items()}
    tcfg = dict(config["text_config"])
    text = _text_config(tcfg.pop("model_type", "llama"), tcfg)
    depth = len([k for k in parts["connector"] if k.endswith(".weight")])
    return Source(
        vision=vision,
        connector=parts["connector"],
        llm=parts["llm"],
        vision_kind=kind,
        vision_config=vcfg,
        feature_layer=layer,
        select=config.get("vision_feature_select_strategy", "default"),
        depth=depth,
        text_config=text,
        image_aspect="resize",
        image_token_index=config.get("image_token_index", config.get("image_token_id")),
        extra=parts.get("extra", {}),
    )


def read_llava_qwen(src: Path, config: dict, state: dict, vision_config) -> Source:
    where = str(src)
    parts = _split(state, SPLIT_RULES["llava_qwen"], where)
    connector, depth = _projector(
        parts["connector"], config.get("mm_projector_type", "linear"), where
    )
    tower = config.get("mm_vision_tower") or config.get("vision_tower") or ""
    vcfg = _tower_config(vision_config, tower, where)
    kind = _tower_kind(vcfg.get("model_type", ""), where)
    if kind == "siglip":
        # LLaVA-NeXT's SigLipVisionTower deletes the last encoder layer and the head, and takes
        # hidden_states[-1] of what is left, with every token (mm_vision_select_layer unused).
        layer, select = -1, "full"
    else:
        layer = config.get("mm_vision_select_layer", -2)
        select = _clip_select(config.get("mm_vision_select_feature", "patch"), where)
    model_type = config.get("model_type", "llava_qwen")
    text = _text_config(TEXT_MODEL_TYPES.get(model_type, model_type), config)
    extra = parts.get("extra", {})
    return Source(
        vision=parts["vision"],
        connector=connector,
        llm=parts["llm"],
        vision_kind=kind,
        vision_config=vcfg,
        feature_layer=layer,
        select=select,
        depth=depth,
        text_config=text,
        image_aspect="pad",
        extra=extra,
        model_args=_onevision_args(config, extra, where),
    )


def _onevision_args(config: dict, extra: dict[str, Tensor], where: str) -> dict:
    """LlavaModel's `anyres` from a LLaVA-NeXT config (`image_aspect_ratio` anyres[_max_N] with
    `mm_patch_merge_type` spatial_unpad), else nothing: classic LLaVA with `pad` images."""
    aspect = str(config.get("image_aspect_ratio", "pad"))
    merge = str(config.get("mm_patch_merge_type", "flat"))
    match = re.fullmatch(r"anyres(?:_max_(\d+))?", aspect)
    if match is None or "unpad" not in merge:
        if aspect != "pad":
            log.warning(
                "%s: image_aspect_ratio %r with mm_patch_merge_type %r is not in lmm (it reads "
                "anyres[_max_N] with spatial_unpad); the recipe uses 'pad', as LLaVA-NeXT does "
                "for multi-image and video inputs",
                where,
                aspect,
                merge,
            )
        return {}
    pinpoints = config.get("image_grid_pinpoints")
    if not pinpoints:
        raise ValueError(
            f"{where}: image_aspect_ratio {aspect!r} needs image_grid_pinpoints in config.json "
            "(the training script's --image_grid_pinpoints, e.g. '(1x1),...,(6x6)'); add it"
        )
    if "image_newline" not in extra:
        raise ValueError(
            f"{where}: mm_patch_merge_type {merge!r} but the weights have no model.image_newline; "
            "is this the full checkpoint (not a projector-only stage-1 save)?"
        )
    pool = config.get("mm_spatial_pool_mode", "bilinear")
    if pool != "bilinear":
        log.warning(
            "%s: mm_spatial_pool_mode %r; lmm pools video frames bilinearly (transformers)",
            where,
            pool,
        )
    return {
        "anyres": {
            "class_path": "lmm.components.anyres.Anyres",
            "init_args": {
                "grid_pinpoints": pinpoints,
                "max_tiles": int(match.group(1)) if match.group(1) else None,
                "video_stride": int(config.get("mm_spatial_pool_stride") or 2),
                # LLaVA-NeXT's model reads a missing mm_newline_position as one_token
                "video_newline": config.get("mm_newline_position", "one_token"),
            },
        }
    }


def read_mipha(src: Path, config: dict, state: dict, vision_config) -> Source:
    where = str(src)
    parts = _split(state, SPLIT_RULES["mipha"], where)
    try:
        tower = dict(config["vision_config"]["vision_tower"])
        projector = config["vision_config"]["mm_projector"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{where}: config.json lacks vision_config.vision_tower / .mm_projector ({err}); "
            "is this a Mipha checkpoint?"
        ) from err
    name = str(tower.get("vision_model_name_or_path", ""))
    # Mipha picks the tower class by substring of its name, as its own builder does
    kind = "siglip" if "siglip" in name else "clip" if "clip" in name else ""
    if not kind:
        raise ValueError(
            f"{where}: vision_model_name_or_path {name!r} names neither CLIP nor SigLIP; "
            "lmm imports those two (Mipha's DINOv2 tower is not supported)"
        )
    if vision_config is not None:
        tower = {**tower, **_tower_config(vision_config, name, where)}
    tower["model_type"] = f"{kind}_vision_model"
    feature = tower.get("mm_vision_select_feature", "patch")
    # Mipha's SigLIP tower keeps every token for both `patch` and `cls_patch`
    select = "full" if kind == "siglip" else _clip_select(feature, where)
    connector, depth = _projector(
        parts["connector"], projector.get("mm_projector_type", "linear"), where
    )
    model_type = config.get("model_type", "mipha_phi")
    text_fields = {k: v for k, v in config.items() if k != "vision_config"}
    text = _text_config(TEXT_MODEL_TYPES.get(model_type, model_type), text_fields)
    return Source(
        vision=parts["vision"],
        connector=connector,
        llm=parts["llm"],
        vision_kind=kind,
        vision_config=tower,
        feature_layer=tower.get("mm_vision_select_layer", -2),
        select=select,
        depth=depth,
        text_config=text,
        image_aspect="pad",
    )


def _clip_select(feature: str, where: str) -> str:
    if feature not in ("patch", "cls_patch"):
        raise ValueError(
            f"{where}: mm_vision_select_feature {feature!r}: expected patch or cls_patch"
        )
    return "default" if feature == "patch" else "full"


def _tower_kind(model_type: str, where: str) -> str:
    kind = model_type.removesuffix("_vision_model")
    if kind not in VISION_CLASSES:
        raise ValueError(
            f"{where}: vision tower type {model_type!r}; lmm imports CLIP and SigLIP towers"
        )
    return kind


def _tower_config(given: str | Path | None, tower: str, where: str) -> dict:
    """The vision tower's config: `given`, else `tower` read offline, else the known-tower table."""
    try:
        config = _config_dict(given if given is not None else tower)
    except (OSError, ValueError) as err:
        if given is not None:
            raise ValueError(f"{where}: cannot read the vision config {given}: {err}") from err
        if tower in KNOWN_TOWERS:
            log.info("%s: using the known config of %s (geometry from the weights)", where, tower)
            return dict(KNOWN_TOWERS[tower])
        raise ValueError(
            f"{where}: cannot read the config of the vision tower {tower!r} ({err}) and it is "
            f"not one of {sorted(KNOWN_TOWERS)}; pass vision_config / --vision-config with the "
            "tower's folder or config.json"
        ) from err
    if config.get("model_type") in ("clip", "siglip"):  # a full CLIP/SigLIP: its vision part
        config = {**config["vision_config"], "model_type": f"{config['model_type']}_vision_model"}
    return config


def _config_dict(name: str | Path) -> dict:
    """A config.json file, or the config of a folder or (cached) hub id."""
    if not str(name):
        raise ValueError("no vision tower named in config.json")
    if Path(name).is_file():
        return json.loads(Path(name).read_text())
    return AutoConfig.from_pretrained(str(name)).to_dict()


def _text_config(model_type: str, fields: dict) -> PretrainedConfig:
    """A causal LM config of `model_type` from a checkpoint's fields, minus the LLaVA ones."""
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"LLM model_type {model_type!r} is not in transformers; known LLaVA wrappers: "
            f"{TEXT_MODEL_TYPES}"
        )
    # Everything else is kept: legacy fields (rope_theta, rope_scaling, ...) still set the model
    kept = {k: v for k, v in fields.items() if k not in _NOT_TEXT and not k.startswith("mm_")}
    if "rope_scaling" in kept and kept["rope_scaling"] is None:
        del kept["rope_scaling"]  # null = no scaling; transformers 5 warns on the legacy field
    return CONFIG_MAPPING[model_type](**kept)


def vision_geometry(weights: dict[str, Tensor], kind: str, where: str) -> dict:
    """Width, depth, MLP size, patch and image size of a CLIP/SigLIP tower from its weights."""
    p = "vision_model."
    try:
        patch = weights[p + "embeddings.patch_embedding.weight"]  # [D, 3, P, P]
        positions = weights[p + "embeddings.position_embedding.weight"].shape[0]
        fc1 = weights[p + "encoder.layers.0.mlp.fc1.weight"]  # [I, D]
    except KeyError as err:
        raise ValueError(f"{where}: vision weights lack {err}; not a CLIP/SigLIP tower") from err
    layers = {
        int(m.group(1)) for k in weights if (m := re.match(rf"{p}encoder\.layers\.(\d+)\.", k))
    }
    side = math.isqrt(positions - (kind == "clip"))
    return {
        "hidden_size": patch.shape[0],
        "patch_size": patch.shape[-1],
        "image_size": side * patch.shape[-1],
        "intermediate_size": fc1.shape[0],
        "num_hidden_layers": max(layers) + 1,
    }
