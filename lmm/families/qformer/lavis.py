"""LAVIS checkpoints (BLIP-2, EVA ViT, Cheetah): reading `.pth` files and mapping their keys to
transformers' BLIP-2 vision model and Q-Former (configs read from the weights)."""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from transformers import (
    Blip2QFormerConfig,
    Blip2VisionConfig,
    PreTrainedModel,
)

from lmm.utils.logging import get_logger

log = get_logger(__name__)

Template = Literal["vicuna", "llama2"]
TEMPLATES = {
    "vicuna": "lmm.data.templates.CheetahVicuna",
    "llama2": "lmm.data.templates.CheetahLlama2",
}

# Keys of the LAVIS files that Cheetah's model does not use, with why (they are dropped).
SKIPPED: tuple[tuple[str, str], ...] = (
    (r"llama_model\.(model\.(embed_tokens|layers|norm|rotary_emb)\.|lm_head\.).*", "frozen LLM"),
    (r"Qformer\.cls\..*", "Q-Former text head"),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*", "Q-Former text"),
    (r"Qformer\.bert\.embeddings\.position_ids", "Q-Former text"),
    (r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*", "Q-Former text FFN"),
    (r"(vision_proj|text_proj|itm_head)\..*|temp", "BLIP-2 stage-1 heads"),
    (r"(t5_proj|t5_model|opt_proj|opt_model)\..*", "BLIP-2's own LLM"),
    (r"visual_encoder\.(norm|fc_norm|head)\..*", "EVA classifier head"),
)

# Cheetah's keys → lmm's (`LMMModule` state-dict names), for `cheetah.safetensors`.
CHEETAH_KEYS = {
    "llama_proj.weight": "model.connector.linear.weight",
    "llama_proj.bias": "model.connector.linear.bias",
    "llama_model.model.query_tokens": "model.vpgc.query_tokens",
    "llama_model.model.qformer_proj.weight": "model.vpgc.qformer_proj.weight",
    "llama_model.model.qformer_proj.bias": "model.vpgc.qformer_proj.bias",
    "llama_model.model.llm_proj.weight": "model.vpgc.llm_proj.weight",
    "llama_model.model.llm_proj.bias": "model.vpgc.llm_proj.bias",
}

# LAVIS EVA ViT (`visual_encoder.*`, `ln_vision.*`) → transformers `Blip2VisionModel`.
_VISION_RULES = (
    (r"visual_encoder\.cls_token", "embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm(1|2)\.(.*)", r"encoder.layers.\1.layer_norm\2.\3"),
    (
        r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight",
        r"encoder.layers.\1.self_attn.qkv.weight",
    ),
    (
        r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(.*)",
        r"encoder.layers.\1.self_attn.projection.\2",
    ),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(.*)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"ln_vision\.(weight|bias)", r"post_layernorm.\1"),
)
_QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias")


# --- reading -----------------------------------------------------------------------------------


def read_pth(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a LAVIS checkpoint (its `model` entry, or the file's dict itself).

    Read with `torch.load(weights_only=True)`: a pickle holding objects other than tensors and
    plain containers is refused, not run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refusing to unpickle objects other than tensors ({err}); re-save its "
            "`model` state dict with torch.save(checkpoint['model'], ...)"
        ) from err
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: expected a LAVIS checkpoint, a dict with a `model` state dict of tensors "
            f"(or the state dict itself), got {type(loaded).__name__}"
        )
    return state


def _merge(sources: Iterable[tuple[str, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Later sources override earlier ones, as Cheetah's successive `load_state_dict` calls do."""
    merged: dict[str, Tensor] = {}
    for name, state in sources:
        overridden = [k for k in state if k in merged]
        if overridden:
            log.info("%s overrides %d tensors of the files before it", name, len(overridden))
        merged.update(state)
    return merged


def _eva(state: dict[str, Tensor], layers: int, where: str) -> dict[str, Tensor]:
    """A bare EVA state dict (`eva_vit_g.pth`) under `visual_encoder.`, its first `layers` blocks.

    LAVIS builds the ViT-g with 39 blocks and loads the 40-block EVA checkpoint non-strictly,
    so the blocks after them are dropped here too.
    """
    if any(k.startswith("visual_encoder.") for k in state):
        return state
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if len(blocks) < layers:
        raise ValueError(
            f"{where}: {len(blocks)} EVA blocks but eva_layers={layers}; pass the number of "
            "blocks the model uses (BLIP-2's ViT-g: 39)"
        )
    dropped = {k for k in state if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m[1]) >= layers}
    if dropped:
        log.info(
            "%s: dropping EVA blocks %d.. (%d tensors), as LAVIS does", where, layers, len(dropped)
        )
    return {f"visual_encoder.{k}": v for k, v in state.items() if k not in dropped}


# --- mapping -----------------------------------------------------------------------------------


def _split(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Sort LAVIS keys into vision / qformer / cheetah; drop the unused, refuse the unknown."""
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "qformer": {}, "cheetah": {}}
    skipped: dict[str, int] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("llama_model.model.Qformer."):
            # Cheetah's LlamaModel holds the Q-Former again (VPG-C re-runs the same module)
            plain = key.removeprefix("llama_model.model.")
            if plain in state:
                if not torch.equal(state[plain], value):
                    raise ValueError(
                        f"{key} differs from {plain}: VPG-C re-runs the same Q-Former in "
                        "Cheetah, so the checkpoint is inconsistent"
                    )
                continue
            key = plain
        if key in CHEETAH_KEYS:
            parts["cheetah"][key] = value
        elif reason := next((r for p, r in SKIPPED if re.fullmatch(p, key)), None):
            skipped[reason] = skipped.get(reason, 0) + 1
        elif key.startswith(("visual_encoder.", "ln_vision.")):
            parts["vision"][key] = value
        elif key.startswith("Qformer.bert.") or key == "query_tokens":
            parts["qformer"][key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are not part of Cheetah's LAVIS layout: {sorted(unknown)[:8]}; "
            "expected visual_encoder.*, ln_vision.*, Qformer.bert.*, query_tokens, llama_proj.*, "
            "llama_model.model.{query_tokens,qformer_proj,llm_proj}.* (docs/families.md)"
        )
    for reason, n in skipped.items():
        log.info("dropped %d tensors: %s (unused by Cheetah)", n, reason)
    return parts


def vision_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LAVIS `visual_encoder.*` + `ln_vision.*` → `Blip2VisionModel` keys.

    EVA's attention has a query and a value bias but no key bias; transformers holds one
    `qkv.bias`: `cat(q_bias, 0, v_bias)`, as transformers' own BLIP-2 conversion does.
    """
    out: dict[str, Tensor] = {}
    biases: dict[int, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if m := _QV_BIAS.fullmatch(key):
            biases.setdefault(int(m[1]), {})[m[2]] = value
            continue
        for pattern, repl in _VISION_RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"vision tower: {len(unknown)} keys do not map to transformers' Blip2VisionModel: "
            f"{sorted(unknown)[:6]} (relative position biases and layer scale are not supported)"
        )
    for i, qv in sorted(biases.items()):
        if set(qv) != {"q", "v"}:
            raise ValueError(f"vision block {i}: has {sorted(qv)} bias but needs both q and v")
        out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat(
            (qv["q"], torch.zeros_like(qv["v"]), qv["v"])
        )
    return out


def qformer_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LAVIS `Qformer.bert.*` → `Blip2QFormerModel` keys (`query_tokens` is left out)."""
    out = {}
    for key, value in state.items():
        if key == "query_tokens":
            continue
        key = key.removeprefix("Qformer.bert.")
        key = key.replace("embeddings.LayerNorm.", "layernorm.")
        key = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", key)
        out[key] = value
    return out


def _layers(keys: Iterable[str], pattern: str) -> list[int]:
    """The sorted layer indices that `pattern`'s group 1 finds in `keys`."""
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def _depth(keys: Iterable[str], pattern: str) -> int:
    """Layer count: one more than the highest index (a missing layer is then a missing key)."""
    return max(_layers(keys, pattern), default=-1) + 1


def _size(hf: dict[str, Tensor], key: str, dim: int, part: str) -> int:
    """`hf[key].shape[dim]`, or an error naming the missing key."""
    if key not in hf:
        raise ValueError(
            f"{part}: no weight {key!r} to read its geometry from; the file is incomplete"
        )
    return hf[key].shape[dim]


def vision_config(hf: dict[str, Tensor], heads: int) -> Blip2VisionConfig:
    """The `Blip2VisionConfig` of EVA weights (`Blip2VisionModel` keys); `heads` is not in them."""
    width = _size(hf, "embeddings.class_embedding", -1, "vision")
    patch = _size(hf, "embeddings.patch_embedding.weight", -1, "vision")
    grid = math.isqrt(_size(hf, "embeddings.position_embedding", 1, "vision") - 1)
    _check_heads(width, heads, "vision_heads")
    return Blip2VisionConfig(
        hidden_size=width,
        intermediate_size=_size(hf, "encoder.layers.0.mlp.fc1.weight", 0, "vision"),
        num_hidden_layers=_depth(hf, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        qkv_bias="encoder.layers.0.self_attn.qkv.bias" in hf,
    )


def qformer_config(hf: dict[str, Tensor], heads: int) -> Blip2QFormerConfig:
    """The `Blip2QFormerConfig` of Q-Former weights (`Blip2QFormerModel` keys)."""
    width = _size(hf, "layernorm.weight", 0, "Q-Former")
    depth = _depth(hf, r"encoder\.layer\.(\d+)\.")
    cross = _layers(hf, r"encoder\.layer\.(\d+)\.crossattention\.")
    every = cross[1] - cross[0] if len(cross) > 1 else depth
    if not cross or cross != list(range(0, depth, every)):
        raise ValueError(
            f"Q-Former: cross-attention in layers {cross} of {depth}; transformers' Q-Former "
            "needs it in every k-th layer from layer 0"
        )
    _check_heads(width, heads, "qformer_heads")
    return Blip2QFormerConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=_size(
            hf, "encoder.layer.0.intermediate_query.dense.weight", 0, "Q-Former"
        ),
        cross_attention_frequency=every,
        encoder_hidden_size=_size(
            hf, "encoder.layer.0.crossattention.attention.key.weight", 1, "Q-Former"
        ),
    )


def _check_heads(width: int, heads: int, name: str) -> None:
    if width % heads:
        raise ValueError(f"{name}={heads} does not divide the width {width}; pass the head count")


def _check_keys(model_cls: type[PreTrainedModel], config, hf: dict[str, Tensor], where: str):
    """Raise naming the missing and unexpected keys if `hf` does not fill `model_cls(config)`."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(hf)), sorted(set(hf) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the weights do not fit transformers' {model_cls.__name__}: "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}"
        )
    shapes = [k for k, v in model.state_dict().items() if v.shape != hf[k].shape]
    if shapes:
        raise ValueError(f"{where}: {len(shapes)} weights have another shape, e.g. {shapes[:4]}")
