"""Export: an lmm LLaVA model → a transformers folder: `LlavaForConditionalGeneration` (classic
LLaVA) or `LlavaOnevisionForConditionalGeneration` (with anyres), with its processor files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import save_torch_state_dict
from torch import Tensor
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
)

from lmm.components.connectors import MLPConnector
from lmm.components.vision import HFVisionTower
from lmm.families.hf import export_vocab, load_parts
from lmm.families.llava.layouts import check_keys
from lmm.families.registry import ExportError
from lmm.utils.logging import get_logger

if TYPE_CHECKING:
    from lmm.training.module import LMMModule

log = get_logger(__name__)


# --- export: lmm → transformers Llava --------------------------------------------------------


def export_hf(module: LMMModule, out: str | Path) -> Path:
    """Write `module` as a transformers folder with its processor: LlavaOnevision when the model
    has anyres, else Llava. What the class cannot express raises ExportError, naming it."""
    if module.model.anyres is not None:
        return export_onevision(module, out)
    return export_llava(module, out)


def export_llava(module: LMMModule, out: str | Path) -> Path:
    """Write `module` as a transformers `LlavaForConditionalGeneration` folder with its processor."""
    out = Path(out)
    model = module.model
    vision, connector, llm = model.vision, model.connector, model.llm.model
    _check_exportable(module, "LlavaForConditionalGeneration")
    if model.multi_image_aspect not in (None, model.image_aspect):
        log.warning(
            "LlavaProcessor has one image transform: images of multi-image prompts get "
            "image_aspect %r in transformers, not the model's multi_image_aspect %r",
            model.image_aspect,
            model.multi_image_aspect,
        )
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = llm.get_input_embeddings().num_embeddings
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    config = LlavaConfig(
        vision_config=copy.deepcopy(vision.model.config),
        text_config=text_config,
        image_token_index=module.image_token_id,
        image_seq_length=vision.num_tokens((vision.image_size, vision.image_size)),
        vision_feature_layer=vision.feature_layer,
        vision_feature_select_strategy=vision.select,
        projector_hidden_act="gelu",
        multimodal_projector_bias=connector.linear_1.bias is not None,
        tie_word_embeddings=tied,
    )
    state: dict[str, Tensor] = {}
    parts = {
        "model.vision_tower.": vision.model,
        "model.multi_modal_projector.": connector,
        "model.language_model.": getattr(llm, llm.base_model_prefix),
        "lm_head.": llm.get_output_embeddings(),
    }
    for prefix, part in parts.items():
        state.update({prefix + k: v.detach() for k, v in part.state_dict().items()})
    if tied:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):  # only to check the key set; no memory
        hf = LlavaForConditionalGeneration(config)
    check_keys(hf, state, "transformers Llava", tied_head=tied)
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = next(iter(state.values())).dtype
    config.save_pretrained(out)
    if hf.generation_config is not None:
        hf.generation_config.save_pretrained(out)
    save_torch_state_dict(_llava_hf_layout(state), out, metadata={"format": "pt"})
    _processor(module).save_pretrained(out)
    log.info("exported %s to %s (transformers LlavaForConditionalGeneration)", type(module), out)
    return out


def _llava_hf_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 5 Llava keys → the llava-hf / Mantis layout every transformers version reads.

    transformers 5 maps these names back on load; 4.x (and vLLM) expect them as they are.
    """
    renames = [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    out = {}
    for key, value in state.items():
        old, new = next((o, n) for o, n in renames if key.startswith(o))
        rest = key[len(old) :]
        if new.endswith("vision_model.") and rest.startswith("vision_model."):
            rest = rest.removeprefix("vision_model.")
        out[new + rest] = value.contiguous()
    return out


def _check_exportable(module: LMMModule, target: str) -> None:
    """Refuse, with the setting that cannot be written, what transformers' `target` cannot express."""
    from lmm.training.lora import has_lora

    model = module.model
    where = f"cannot export to {target}"
    if has_lora(module):
        raise ExportError(
            f"{where}: LoRA adapters; merge them first (lmm.training.lora.merge_lora)"
        )
    if not isinstance(model.vision, HFVisionTower):
        raise ExportError(
            f"{where}: the vision tower is {type(model.vision).__name__}; it needs a CLIP or "
            "SigLIP HFVisionTower"
        )
    conn = model.connector
    if not isinstance(conn, MLPConnector):  # LinearConnector, or a custom one
        raise ExportError(
            f"{where}: the connector is {type(conn).__name__}; its projector is always "
            "Linear → GELU → Linear (MLPConnector with depth: 2, merge: 1)"
        )
    if conn.depth != 2:
        raise ExportError(
            f"{where}: MLPConnector depth {conn.depth}; its projector has exactly 2 linear "
            "layers (depth: 2)"
        )
    if conn.merge != 1:
        raise ExportError(
            f"{where}: MLPConnector merge {conn.merge} regroups {conn.merge}x{conn.merge} tokens "
            "into one; it projects every vision token on its own (merge: 1)"
        )
    if not isinstance(model.vision.feature_layer, int):
        raise ExportError(f"{where}: feature_layer {model.vision.feature_layer}; it takes an int")
    head = model.llm.model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ExportError(
            f"{where}: the LLM's lm_head has a bias ({type(model.llm.model).__name__}, e.g. "
            "Phi); its lm_head has none. Keep the model in lmm's layout"
        )
    anyres = model.anyres
    if anyres is None:
        return
    if anyres.video_newline != "one_token":
        raise ExportError(
            f"{where}: anyres video_newline {anyres.video_newline!r}; transformers puts one "
            "newline after each video (video_newline: one_token)"
        )
    if anyres.video_stride != 2:
        raise ExportError(
            f"{where}: anyres video_stride {anyres.video_stride}; transformers pools video frames "
            "by 2 (video_stride: 2)"
        )
    if anyres.max_tiles is None:
        raise ExportError(
            f"{where}: anyres max_tiles null (plain anyres); transformers reads anyres_max_<N> "
            "only (max_tiles: N)"
        )


# --- LLaVA-OneVision -----------------------------------------------------------------------------


def export_onevision(module: LMMModule, out: str | Path) -> Path:
    """Write `module` (a LlavaModel with anyres) as a transformers
    `LlavaOnevisionForConditionalGeneration` folder with its tokenizer, image and video
    processor configs and processor config (the files llava-hf's OneVision repos have).

    transformers marks videos with `<video>`; a tokenizer without it gets it (`export_vocab`).
    """
    target = "LlavaOnevisionForConditionalGeneration"
    _check_exportable(module, target)
    out = Path(out)
    model, anyres = module.model, module.model.anyres
    vision, connector, llm = model.vision, model.connector, model.llm.model
    tok, rows, vocab = export_vocab(module.tokenizer, llm, {"<video>": module.image_token})
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = vocab
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    config = LlavaOnevisionConfig(
        vision_config=copy.deepcopy(vision.model.config).to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=module.image_token_id,
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=vision.feature_layer,
        vision_feature_select_strategy=vision.select,
        image_grid_pinpoints=[list(p) for p in anyres.pinpoints],
        vision_aspect_ratio=f"anyres_max_{anyres.max_tiles}",
        projector_hidden_act="gelu",
        multimodal_projector_bias=connector.linear_1.bias is not None,
        tie_word_embeddings=tied,
    )
    config.architectures = [target]
    with torch.device("meta"):
        hf = LlavaOnevisionForConditionalGeneration(config)
    base = getattr(llm, llm.base_model_prefix)
    text = {**base.state_dict(), _embedding_key(base): rows["embed"]}
    hf.model.image_newline = torch.nn.Parameter(anyres.image_newline.detach().clone())
    load_parts(
        hf,
        {
            "model.vision_tower": vision.model,
            "model.multi_modal_projector": connector,
            "model.language_model": text,
            "lm_head": {"weight": rows["head"]},
        },
    )
    if tied:
        hf.tie_weights()
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    _onevision_processor_files(module, out, tok)
    log.info("exported %s to %s (transformers %s)", type(module.model).__name__, out, target)
    return out


def _embedding_key(base: torch.nn.Module) -> str:
    """The state-dict key of a decoder's input embeddings (`embed_tokens.weight` for most)."""
    embed = base.get_input_embeddings()
    return next(f"{n}.weight" for n, m in base.named_modules() if m is embed)


def _onevision_processor_files(module: LMMModule, out: Path, tok) -> None:
    """The image processor (the model's tile size, pinpoints, mean and std), the video processor
    (frames squashed to a tile) and the processor settings, as LlavaOnevisionProcessor reads them."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,  # the PIL one: no torchvision needed to write it
    )

    model = module.model
    vision, anyres = model.vision, model.anyres
    side = vision.image_size
    LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side},
        image_grid_pinpoints=[list(p) for p in anyres.pinpoints],
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    ).save_pretrained(out)
    video = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": {"height": side, "width": side},
        "resample": 3,  # bicubic, as lmm squashes frames
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(vision.image_mean),
        "image_std": list(vision.image_std),
        "do_convert_rgb": True,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "image_token": module.image_token,
        "video_token": "<video>",
        # the tower's tokens, CLIP's CLS included (the processor drops it for select: default)
        "num_image_tokens": vision.sequence_length((side, side)),
        "vision_aspect_ratio": f"anyres_max_{anyres.max_tiles}",
        "vision_feature_select_strategy": vision.select,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _processor(module: LMMModule) -> LlavaProcessor:
    """A LlavaProcessor with our tokenizer and an image processor with our size, mean and std."""
    from transformers import LlavaImageProcessor  # warns without torchvision: import on use

    vision, aspect = module.model.vision, module.model.image_aspect
    side = vision.image_size
    square = {"height": side, "width": side}
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": side} if aspect == "crop" else square,
        crop_size=square,
        do_center_crop=aspect == "crop",
        do_pad=aspect == "pad",  # expand to a square with the mean colour first (LLaVA `pad`)
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=module.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=vision.select,
        num_additional_image_tokens=int(vision.kind == "clip"),  # CLIP's CLS token
        image_token=module.image_token,
    )
