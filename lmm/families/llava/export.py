"""Export: an lmm LLaVA model → a transformers `LlavaForConditionalGeneration` folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch
from huggingface_hub import save_torch_state_dict
from torch import Tensor
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from lmm.components.connectors import MLPConnector
from lmm.components.vision import HFVisionTower
from lmm.families.llava.layouts import check_keys
from lmm.utils.logging import get_logger

if TYPE_CHECKING:
    from lmm.training.module import LMMModule

log = get_logger(__name__)

Layout = Literal["mantis", "llava_qwen", "mipha"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


# --- export: lmm → transformers Llava --------------------------------------------------------


def export_hf(module: LMMModule, out: str | Path) -> Path:
    """Write `module` as a transformers `LlavaForConditionalGeneration` folder with its processor."""
    out = Path(out)
    model = module.model
    vision, connector, llm = model.vision, model.connector, model.llm.model
    _check_exportable(module)
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


def _check_exportable(module: LMMModule) -> None:
    """Refuse, with the reason, what transformers' Llava cannot express."""
    model = module.model
    where = "export_hf"
    if not isinstance(model.vision, HFVisionTower):
        raise ValueError(
            f"{where}: the vision tower is {type(model.vision).__name__}; transformers' Llava "
            "needs a CLIP or SigLIP HFVisionTower"
        )
    conn = model.connector
    if not isinstance(conn, MLPConnector):  # LinearConnector, or a custom one
        raise ValueError(
            f"{where}: the connector is {type(conn).__name__}; transformers' Llava projector is "
            "always Linear → GELU → Linear (MLPConnector with depth: 2, merge: 1)"
        )
    if conn.depth != 2:
        raise ValueError(
            f"{where}: MLPConnector depth {conn.depth}; transformers' Llava projector has exactly "
            "2 linear layers (depth: 2)"
        )
    if conn.merge != 1:
        raise ValueError(
            f"{where}: MLPConnector merge {conn.merge} regroups {conn.merge}x{conn.merge} tokens "
            "into one; transformers' Llava projects every vision token on its own (merge: 1)"
        )
    if not isinstance(model.vision.feature_layer, int):
        raise ValueError(f"{where}: feature_layer must be an int, got {model.vision.feature_layer}")
    if model.anyres is not None:
        raise ValueError(
            f"{where}: the model uses anyres (LLaVA-OneVision tiles and newlines); transformers' "
            "Llava has neither. Export to LlavaOnevisionForConditionalGeneration is not written yet"
        )
    head = model.llm.model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(
            f"{where}: the LLM's lm_head has a bias ({type(model.llm.model).__name__}, e.g. Phi); "
            "transformers' Llava lm_head has none. Use the LLM folder with lmm instead."
        )


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
