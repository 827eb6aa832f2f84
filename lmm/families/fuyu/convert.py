"""Fuyu checkpoint conversion: a transformers Fuyu folder (Fuyu-8B, Mantis-8B-Fuyu) ↔ lmm's layout.

Import reads the folder with `FuyuForCausalLM.from_pretrained` (the published key layout,
`language_model.*` / `vision_embed_tokens.*`, as transformers reads it) and writes `llm/` (the
Persimmon causal LM: Fuyu's `language_model` and `lm_head`), `patch_embedding.safetensors`
(`vision_embed_tokens`), `tokenizer/` and `lmm.yaml`, the `model:` part of a recipe that builds
the whole model from those files. Export writes a folder `FuyuForCausalLM.from_pretrained` and
`FuyuImageProcessor` load.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    FuyuConfig,
    FuyuForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

from lmm.data.tokenization import checkpoint_tokenizer
from lmm.families.fuyu.model import IMAGE_TOKEN, NEWLINE_TOKEN
from lmm.families.hf import processor_configs
from lmm.families.registry import ExportError, component, import_recipe
from lmm.training.checkpoint import save_safetensors
from lmm.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_CANVAS = (1080, 1920)  # FuyuImageProcessor's size when a folder has no preprocessor config
# The tokens MFuyuProcessor writes around an image's patches (Fuyu-8B: none before, <s> after).
MANTIS_PREFIX = ["|IMAGE|"]
MANTIS_SUFFIX = ["|ENDOFIMAGE|", "<s>"]

if TYPE_CHECKING:
    from lmm.training.module import LMMModule


def import_checkpoint(
    src: str | Path, out: str | Path, tokenizer: str | Path | None = None
) -> Path:
    """Split a transformers Fuyu checkpoint folder into lmm's layout under `out`; return `out/lmm.yaml`.

    The canvas and patch size come from the folder's `preprocessor_config.json` (default:
    1080x1920, the config's patch size); the tokenizer (default: `src`) must map `|SPEAKER|`
    to the config's `image_token_id`.
    """
    src, out = Path(src), Path(out)
    config = _fuyu_config(src)
    tok = _tokenizer(tokenizer or src)
    vocab = tok.get_vocab()
    for token in (IMAGE_TOKEN, NEWLINE_TOKEN):
        if token not in vocab:
            raise ValueError(
                f"{tokenizer or src}: the tokenizer has no {token!r}, which Fuyu's image text "
                "needs; pass the checkpoint's own tokenizer (--tokenizer)"
            )
    if config.image_token_id is not None and vocab[IMAGE_TOKEN] != config.image_token_id:
        raise ValueError(
            f"{src}: config.json has image_token_id {config.image_token_id} but the tokenizer "
            f"maps {IMAGE_TOKEN} to {vocab[IMAGE_TOKEN]}; pass the checkpoint's own tokenizer"
        )
    canvas, patch = _image_geometry(src, config)
    hf = FuyuForCausalLM.from_pretrained(src, dtype="auto")
    out.mkdir(parents=True, exist_ok=True)
    persimmon_from_fuyu(hf).save_pretrained(out / "llm")
    patch_embedding = {
        k: v.contiguous() for k, v in hf.model.vision_embed_tokens.state_dict().items()
    }
    save_safetensors(patch_embedding, out / "patch_embedding.safetensors")
    tok.save_pretrained(out / "tokenizer")
    recipe = out / "lmm.yaml"
    mantis = all(t in vocab for t in MANTIS_PREFIX + MANTIS_SUFFIX)
    dtype = str(hf.dtype).removeprefix("torch.")
    recipe.write_text(_recipe(src, out, dtype, canvas, patch, mantis))
    log.info("imported Fuyu %s into %s (canvas %dx%d, patch %d)", src, out, *canvas, patch)
    return recipe


def write_layout_configs(
    config: FuyuConfig, tokenizer: PreTrainedTokenizerBase, out: str | Path
) -> None:
    """The folders `import_checkpoint` writes, without weights: `out/llm/` (the Persimmon
    config `persimmon_from_fuyu` saves) and `out/tokenizer/`; for a sizes-only build (`lmm
    plan`, `lmm.published.IMPORTS`)."""
    out = Path(out)
    text_config = copy.deepcopy(config.text_config)
    text_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]]
    text_config.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "tokenizer")


def persimmon_from_fuyu(hf: FuyuForCausalLM) -> PreTrainedModel:
    """The causal LM inside a Fuyu model (its text model and lm_head), sharing their weights."""
    text_config = copy.deepcopy(hf.config.text_config)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.set_output_embeddings(hf.lm_head)
    llm.config.architectures = [type(llm).__name__]
    return llm


def export_hf(module: LMMModule, out: str | Path) -> Path:
    """Write `module` as a transformers Fuyu folder (model, tokenizer, image processor); return it.

    The folder has the published key layout and `image_token_id` = the module's `|SPEAKER|` id;
    `FuyuForCausalLM.from_pretrained(out)` gives the module's logits. The image processor has
    the model's canvas and patch size. LoRA adapters must be merged first.
    """
    from lmm.training.lora import has_lora

    if has_lora(module):
        raise ExportError(
            "cannot export to FuyuForCausalLM: LoRA adapters; merge them first "
            "(lmm.training.lora.merge_lora)"
        )
    out = Path(out)
    model = module.model
    llm = module.model.llm.model
    config = FuyuConfig(
        text_config=llm.config.to_dict(),
        patch_size=model.patch_size,
        num_channels=3,
        image_token_id=module.image_token_id,
    )
    with torch.device("meta"):
        hf = FuyuForCausalLM(config)
    hf.model.language_model = getattr(llm, llm.base_model_prefix)
    hf.lm_head = llm.get_output_embeddings()
    hf.model.vision_embed_tokens = model.vision
    hf.save_pretrained(out)
    height, width = model.canvas
    p = model.patch_size
    FuyuImageProcessorPil(
        size={"height": height, "width": width}, patch_size={"height": p, "width": p}
    ).save_pretrained(out)
    module.tokenizer.save_pretrained(out)
    log.info("exported the Fuyu model to %s", out)
    return out


# --- helpers --------------------------------------------------------------------------------


def _fuyu_config(src: Path) -> FuyuConfig:
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"{src}/config.json not found; expected a transformers Fuyu checkpoint folder "
            "(save_pretrained's layout, e.g. a download of adept/fuyu-8b)"
        )
    config = AutoConfig.from_pretrained(src)
    if config.model_type != "fuyu":
        raise ValueError(
            f"{src}: model_type is {config.model_type!r}, not 'fuyu'; `lmm convert import "
            "--layout fuyu` reads transformers Fuyu checkpoints (FuyuForCausalLM)"
        )
    return config


def _tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return checkpoint_tokenizer(path, image_token=None)


def _image_geometry(src: Path, config: FuyuConfig) -> tuple[tuple[int, int], int]:
    """((height, width) of the canvas, patch size): the preprocessor config's, rounded up as Mantis."""
    pre, _ = processor_configs(src)
    patch = int(config.patch_size)
    canvas = DEFAULT_CANVAS
    if pre:
        size, patch_size = pre.get("size") or {}, pre.get("patch_size") or {}
        if patch_size and (patch_size.get("height"), patch_size.get("width")) != (patch, patch):
            raise ValueError(
                f"{src}: the image processor's patch_size {patch_size} but config.json has "
                f"patch_size {patch}; lmm's Fuyu uses square patches of the model's size"
            )
        if size:
            canvas = (int(size["height"]), int(size["width"]))
    else:
        log.info("%s: no image processor config; canvas %dx%d", src, *canvas)
    rounded = tuple(-(-side // patch) * patch for side in canvas)
    if rounded != canvas:
        log.info(
            "canvas %s rounded up to %s, a multiple of the %d-px patch", canvas, rounded, patch
        )
    return (rounded[0], rounded[1]), patch


def _recipe(
    src: Path, out: Path, dtype: str, canvas: tuple[int, int], patch: int, mantis: bool
) -> str:
    model = component(
        "lmm.families.fuyu.FuyuModel",
        llm=component(
            "lmm.components.language.CausalLM", path=str((out / "llm").resolve()), dtype=dtype
        ),
        patch_size=patch,
        image_height=canvas[0],
        image_width=canvas[1],
        patch_embedding=str((out / "patch_embedding.safetensors").resolve()),
        image_prefix=MANTIS_PREFIX if mantis else [],
        image_suffix=MANTIS_SUFFIX if mantis else ["<s>"],
    )
    if mantis:
        text = [
            "The tokenizer has |IMAGE| and |ENDOFIMAGE|: a Mantis-Fuyu checkpoint, so images are",
            "written as MFuyuProcessor does; its data template is lmm.data.templates.MantisFuyu.",
        ]
    else:
        text = [
            "Images are written as Fuyu-8B's processor does (patch rows, then <s>); for Mantis-Fuyu",
            "fine-tuning see recipes/mantis/fuyu.yaml.",
        ]
    header = [
        f"Imported from {src} by `lmm convert import --layout fuyu`: the model part of a recipe.",
        "Every weight loads from the files named here.",
        *text,
    ]
    template = "lmm.data.templates.MantisFuyu" if mantis else "lmm.data.templates.Fuyu"
    return import_recipe(header, model, str((out / "tokenizer").resolve()), template)
