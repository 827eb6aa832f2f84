"""`lmm plan`'s model side: a recipe's model built at full size on the meta device (no weights,
no network; `lmm.published` stands in for hub files that are not here) and its parameters
counted per part."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from lmm.components.pretrained import empty_init
from lmm.training.module import LMMModule
from lmm.training.recipe import build_module

KEYS = ("parameters", "trainable", "frozen", "adapters")


def meta_module(config: Mapping, where: str = "<recipe>") -> LMMModule:
    """The recipe's `model:` section built on the meta device, at full size.

    A 4-bit / 8-bit LLM (QLoRA) is built unquantized: bitsandbytes quantizes at load, so the
    shapes, and the parameter count before packing, are those of the base model. LoRA
    adapters are applied as the recipe says."""
    config = copy.deepcopy(dict(config))
    model = config["model"]["init_args"].get("model") or {}
    llm = (model.get("init_args") or {}).get("llm") or {}
    (llm.get("init_args") or {}).pop("quantization", None)
    lora = config["model"]["init_args"].get("lora")
    if lora:
        lora["quantize"] = None  # (its check that the LLM is quantized too)
    with empty_init(every_rank=True, published=True):
        return build_module(config, where)


def parameter_counts(module: LMMModule) -> dict[str, dict[str, int]]:
    """Per part of the family model (`vision`, `connector`, `llm`, ...) and `total`: the
    parameters, `trainable`, `frozen` and LoRA `adapters` (peft's `lora_*` tensors, trainable;
    the base is `parameters - adapters`); a tied tensor counts once (as `module.parameters()`)."""
    parts: dict[str, dict[str, int]] = {}
    for name, param in module.named_parameters():  # shared tensors are yielded once
        part = name.removeprefix("model.").split(".")[0]
        row = parts.setdefault(part, dict.fromkeys(KEYS, 0))
        row["parameters"] += param.numel()
        row["trainable" if param.requires_grad else "frozen"] += param.numel()
        row["adapters"] += param.numel() * (".lora_" in name)
    total = {k: sum(row[k] for row in parts.values()) for k in KEYS}
    return {**parts, "total": total}
