"""LLaVA checkpoint conversion: import transformers Llava (Mantis) and OneVision folders, LLaVA-NeXT
(`llava_qwen`) and Mipha; export to transformers (Llava, or OneVision with anyres).

Import writes lmm's layout (`vision/`, `llm/`, `tokenizer/` folders, `weights.safetensors`
with the connector and OneVision's newline, `lmm.yaml`); export writes a folder `transformers.LlavaForConditionalGeneration` and
`AutoProcessor` load. Key maps and limits: docs/convert.md.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
)

from lmm.components.connectors import LinearConnector, MLPConnector
from lmm.components.vision import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from lmm.data.sample import IMAGE_MARKER
from lmm.data.tokenization import checkpoint_tokenizer
from lmm.families.hf import processor_configs
from lmm.families.llava import layouts
from lmm.families.llava.export import export_hf as export_hf  # the family's exporter
from lmm.families.llava.layouts import Source
from lmm.families.registry import component, import_recipe
from lmm.training.checkpoint import load_safetensors, save_safetensors
from lmm.utils.logging import get_logger

log = get_logger(__name__)

Layout = Literal["mantis", "onevision", "llava_qwen", "mipha"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


_RECOMPUTED = ("rotary_emb.inv_freq", "embeddings.position_ids")


def load_state_dict(src: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint folder: safetensors (single or sharded) first, else `.bin`."""
    src = Path(src)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return _load_files([src / f for f in files])
        if (src / single).is_file():
            return _load_files([src / single])
    raise FileNotFoundError(
        f"{src}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json); "
        "expected a checkpoint folder as save_pretrained writes it"
    )


def _load_files(files: Sequence[Path]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_safetensors(file))  # a bad file: CheckpointError naming it
        else:
            state.update(_torch_load(file))
    return state


def _torch_load(file: Path) -> dict:
    """`torch.load` with `weights_only=True`; a pickle with code in it is refused, not run."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{file}: refusing to unpickle objects other than tensors ({err}). Re-save it as a "
            "plain state dict or as safetensors."
        ) from err


# --- import: published layouts → lmm --------------------------------------------------------


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    layout: Layout,
    vision_config: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Convert a published checkpoint folder into lmm's layout under `out`; return `out/lmm.yaml`.

    `vision_config` is a folder, config.json or hub id of the vision tower's config, for
    `llava_qwen` checkpoints whose `mm_vision_tower` cannot be read offline. `tokenizer`
    defaults to `src`.
    """
    src, out = Path(src), Path(out)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = layouts.read_json(src / "config.json")
    state = {k: v for k, v in load_state_dict(src).items() if not k.endswith(_RECOMPUTED)}
    readers: dict[str, Callable[..., Source]] = {
        "mantis": layouts.read_mantis,
        "onevision": layouts.read_onevision,
        "llava_qwen": layouts.read_llava_qwen,
        "mipha": layouts.read_mipha,
    }
    source = readers[layout](src, config, state, vision_config)
    out.mkdir(parents=True, exist_ok=True)
    vision_dir = _write_vision(source, src, out / "vision")
    llm_dir = _write_llm(source, out / "llm")
    conn = _build_connector(source)
    layouts.check_keys(conn, source.connector, f"{src} connector")
    weights = {f"model.connector.{k}": v for k, v in source.connector.items()}
    weights.update({f"model.anyres.{k}": v for k, v in source.extra.items()})
    save_safetensors(weights, out / "weights.safetensors")  # with hashes, checked by init_from
    tok = checkpoint_tokenizer(tokenizer or src)
    image_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    if source.image_token_index is not None and image_id != source.image_token_index:
        raise ValueError(
            f"{src}: config.json has image_token_index {source.image_token_index} but the "
            f"tokenizer maps <image> to {image_id}; pass the checkpoint's own tokenizer"
        )
    tok.save_pretrained(out / "tokenizer")
    recipe = out / "lmm.yaml"
    recipe.write_text(_recipe(source, layout, src, out, vision_dir, llm_dir))
    log.info("imported %s (%s) into %s", src, layout, out)
    return recipe


def _write_vision(source: Source, src: Path, out: Path) -> Path:
    """Save the vision tower as a transformers CLIP/SigLIP vision model folder."""
    kind, where = source.vision_kind, f"{src} vision tower"
    config_cls, model_cls = layouts.VISION_CLASSES[kind]
    fields = {**source.vision_config, **layouts.vision_geometry(source.vision, kind, where)}
    if kind == "siglip":
        fields["vision_use_head"] = any(k.startswith("vision_model.head.") for k in source.vision)
    if fields["num_hidden_layers"] != source.vision_config.get(
        "num_hidden_layers", fields["num_hidden_layers"]
    ):
        log.info(
            "%s: %d encoder layers in the weights (config says %d); using the weights",
            where,
            fields["num_hidden_layers"],
            source.vision_config["num_hidden_layers"],
        )
    known = set(config_cls().to_dict())
    config = config_cls(**{k: v for k, v in fields.items() if k in known and k != "model_type"})
    _load_and_save(model_cls, config, source.vision, out, where)
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    pre, _ = processor_configs(src)
    mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    # HFVisionTower reads the normalization from here
    (out / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(mean), "image_std": list(std), "size": config.image_size})
    )
    return out


def _write_llm(source: Source, out: Path) -> Path:
    config = source.text_config
    config.architectures = None
    _load_and_save(AutoModelForCausalLM.from_config, config, source.llm, out, "LLM")
    return out


def _load_and_save(factory, config, weights: dict[str, Tensor], out: Path, where: str) -> None:
    """Build the model on the meta device, put `weights` in (no copy) and `save_pretrained`."""
    with torch.device("meta"):
        model = factory(config)
    expected = set(model.state_dict())
    if not any(k.startswith("vision_model.") for k in expected):
        # transformers 5 keeps CLIP/SigLIP vision weights without the `vision_model.` prefix
        weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    layouts.check_keys(model, weights, where, tied_head=tied)
    model.load_state_dict(weights, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.save_pretrained(out)


def _build_connector(source: Source) -> nn.Module:
    d_vis = source.vision["vision_model.embeddings.patch_embedding.weight"].shape[0]
    d_llm = source.text_config.hidden_size
    with torch.device("meta"):
        if source.depth == 0:
            return LinearConnector(d_vis, d_llm)
        return MLPConnector(d_vis, d_llm, depth=source.depth)


def _recipe(source: Source, layout: str, src: Path, out: Path, vision: Path, llm: Path) -> str:
    """The `model:` part of a recipe that builds the imported model."""
    dtype = str(next(iter(source.llm.values())).dtype).removeprefix("torch.")
    vdtype = str(next(iter(source.vision.values())).dtype).removeprefix("torch.")
    if source.depth == 0:
        connector = component("lmm.components.connectors.LinearConnector")
    else:
        connector = component("lmm.components.connectors.MLPConnector", depth=source.depth)
    model = component(
        "lmm.families.llava.LlavaModel",
        vision=component(
            "lmm.components.vision.HFVisionTower",
            path=str(vision.resolve()),
            feature_layer=source.feature_layer,
            select=source.select,
            dtype=vdtype,
        ),
        llm=component("lmm.components.language.CausalLM", path=str(llm.resolve()), dtype=dtype),
        connector=connector,
        image_aspect=source.image_aspect,
        **source.model_args,
    )
    header = [
        f"Imported from {src} (layout {layout}) by `lmm convert import`.",
        "The model part of a recipe: the vision tower and LLM from their folders, the",
        "connector (and OneVision's image_newline) from weights.safetensors (init_from).",
        f"Data template that matches the source: {_template_hint(layout)}.",
    ]
    tokenizer = str((out / "tokenizer").resolve())
    weights = str((out / "weights.safetensors").resolve())
    return import_recipe(header, model, tokenizer, init_from=weights)


# --- building modules -----------------------------------------------------------------------


def _template_hint(layout: str) -> str:
    from lmm.families.llava import FAMILY

    return next(lay.template for lay in FAMILY.layouts if lay.name == layout)
