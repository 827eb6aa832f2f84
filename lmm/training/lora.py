"""LoRA, DoRA and QLoRA for any family via peft: targets by name pattern, adapter save/load, merge.

Modules are named `{part}.{path}`: the part from `module.parts()` (`vision`, `connector`,
`llm`) and the module's path inside it, e.g. `llm.model.model.layers.0.self_attn.q_proj`
for the LLaVA family. `lora_targets` lists what a config matches. peft injects its layers
in place (`inject_adapter_in_model`), so the transformers LLM keeps its type and layout:
`module(batch)`, generation and the FSDP2 plan see the same model, and state-dict keys
only gain `.base_layer` / `.lora_A.default` / `.lora_B.default` (DoRA: `.lora_magnitude_vector`).

An adapter directory holds `adapter_model.safetensors` (LoRA weights, peft key style
without the adapter name), `non_lora_trainables.safetensors` (every other trainable
parameter, e.g. the connector, as Mantis's `non_lora_trainables.bin`) and
`lora_config.json` (the config and the resolved targets).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lmm.training.checkpoint import load_safetensors, save_safetensors
from lmm.utils.logging import get_logger

log = get_logger(__name__)

ADAPTER = "default"  # peft's adapter name; left out of the saved keys, as peft does
ADAPTER_FILE = "adapter_model.safetensors"
TRAINABLES_FILE = "non_lora_trainables.safetensors"
CONFIG_FILE = "lora_config.json"


@dataclass
class LoraConfig:
    """Low-rank adapters on the modules a pattern names (recipe: `model.init_args.lora`).

    Defaults are Mantis's (all LLM linear layers but `lm_head`, r 128, α 256, dropout 0.05).
    Idefics2 (Mantis): r 8, alpha 8, dropout 0.1, init gaussian,
    target `.*(llm|connector).*(down|gate|up|k|q|v|o)_proj.*$`.

    Args:
        r: rank of each low-rank update.
        alpha: scale numerator: the update is `(alpha / r) · B A x`.
        dropout: dropout on the adapter's input during training.
        target: regex full-matched against `{part}.{path}` names of linear layers
            (`lmm.training.lora.lora_targets` lists the matches); default: every linear of the LLM.
        exclude: regex of names never targeted, even if `target` matches (default: `lm_head`).
        dora: weight-decomposed LoRA (DoRA): also train a per-output-channel magnitude.
        init: initialisation of A: `default` (Kaiming-uniform, peft's) or `gaussian`; B starts at 0.
        quantize: the LLM's base weights are loaded quantized by bitsandbytes (QLoRA):
            `nf4` / `fp4` (4-bit) or `int8`; the LLM must be built with
            `CausalLM(quantization=quantization_kwargs(this config))`. None: full precision.
        double_quant: 4-bit only: quantize the quantization constants too (QLoRA's double quant).
        compute_dtype: 4-bit only: dtype of the dequantized matmuls (`bfloat16`, `float32`, `float16`).
        train_parts: parts trained in full beside the adapters and saved with them (the connector);
            every other non-adapter parameter is frozen.
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target: str = r"llm\..*"
    exclude: str | None = r".*lm_head"
    dora: bool = False
    init: Literal["default", "gaussian"] = "default"
    quantize: Literal["nf4", "fp4", "int8"] | None = None
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    train_parts: list[str] = field(default_factory=lambda: ["connector"])

    def peft_config(self, targets: list[str]) -> PeftLoraConfig:
        """The peft config that adapts exactly `targets` (qualified module names)."""
        return PeftLoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(targets),
            use_dora=self.dora,
            init_lora_weights=True if self.init == "default" else self.init,
            bias="none",
        )


def quantization_kwargs(cfg: LoraConfig) -> dict | None:
    """`BitsAndBytesConfig` arguments for `CausalLM(quantization=...)` (None: full precision)."""
    if cfg.quantize is None:
        return None
    if cfg.quantize == "int8":
        return {"load_in_8bit": True}
    if cfg.quantize not in ("nf4", "fp4"):
        raise ValueError(
            f"LoraConfig.quantize must be nf4, fp4, int8 or None, got {cfg.quantize!r}"
        )
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": cfg.quantize,
        "bnb_4bit_use_double_quant": cfg.double_quant,
        "bnb_4bit_compute_dtype": cfg.compute_dtype,
    }


def _root(module) -> nn.ModuleDict:
    """The parts under one container, so that module names read `{part}.{path}`."""
    return nn.ModuleDict(module.parts())


def _saved_root(module) -> nn.ModuleDict:
    """`_root` plus the parts LoRA leaves alone but an adapter directory keeps (a score head)."""
    parts = module.all_parts() if hasattr(module, "all_parts") else module.parts()
    return nn.ModuleDict(parts)


def _is_lora_param(name: str) -> bool:
    return any(piece.startswith("lora_") for piece in name.split("."))


def has_lora(module) -> bool:
    """Whether adapters are injected in any part of `module`."""
    return any(isinstance(m, BaseTunerLayer) for m in _root(module).modules())


def _quantization(llm: nn.Module) -> str | None:
    if getattr(llm, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(llm, "is_loaded_in_8bit", False):
        return "8bit"
    return None


def _no_cpu_packing(llm: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers in their training layout on CPUs with AVX512-BF16.

    bitsandbytes (0.50 here) repacks a `Linear4bit` for a fused bf16 kernel at its first eval-mode
    forward without gradients (a validation step): the scales drop to bf16, and the packed
    forward passes no gradient to its input, so every adapter below the last layer silently
    stops learning. The repacking is turned off here, and undone where it already happened.
    """
    import bitsandbytes as bnb  # only for quantized models: its import warns about `kernels`
    from bitsandbytes import functional as bnbf

    unpacked = 0
    for sub in llm.modules():
        if not isinstance(sub, bnb.nn.Linear4bit):
            continue
        sub.support_avx512bf16_for_cpu = False
        state = getattr(sub.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(sub.weight.data, state)
            sub.weight.data, sub.weight.quant_state = data, state
            unpacked += 1
    if unpacked:
        log.warning(
            "%d 4-bit layers had been repacked for CPU inference (scales rounded to bf16); "
            "restored their training layout. Apply LoRA before any eval forward to avoid the rounding",
            unpacked,
        )


def lora_targets(module, cfg: LoraConfig) -> list[str]:
    """The `{part}.{path}` names of the linear layers `cfg.target` matches and `cfg.exclude` does not."""
    target = re.compile(cfg.target)
    exclude = re.compile(cfg.exclude) if cfg.exclude else None
    names, linears = [], []
    for name, sub in _root(module).named_modules():
        if isinstance(sub, nn.Linear) and not isinstance(sub, BaseTunerLayer):
            linears.append(name)
            if target.fullmatch(name) and not (exclude and exclude.fullmatch(name)):
                names.append(name)
    if not names:
        examples = ", ".join(linears[:3] + linears[-2:])
        raise ValueError(
            f"LoRA target {cfg.target!r} (exclude {cfg.exclude!r}) matches no linear layer of "
            f"{type(module).__name__}; names look like: {examples}. Fix `lora.target`."
        )
    return names


def apply_lora(module, cfg: LoraConfig) -> list[str]:
    """Inject adapters into `module`'s parts in place; train only them and `cfg.train_parts`.

    A quantized LLM is first prepared for k-bit training (peft: non-quantized parameters
    to fp32; activation checkpointing is left to the strategy). Sets `module.lora_config`
    (what `save_adapter` records). Returns the adapted names.
    """
    parts = module.parts()
    unknown = set(cfg.train_parts) - set(parts)
    if unknown:
        raise ValueError(
            f"lora.train_parts names unknown parts {sorted(unknown)}; parts: {sorted(parts)}"
        )
    if has_lora(module):
        raise ValueError(
            f"{type(module).__name__} already has LoRA adapters; apply_lora runs once per model "
            "(use load_adapter to load weights into it)"
        )
    quantized = _quantization(module.model.llm.model)
    expected = None if cfg.quantize is None else ("8bit" if cfg.quantize == "int8" else "4bit")
    if quantized != expected:
        raise ValueError(
            f"lora.quantize is {cfg.quantize!r} but the LLM is loaded "
            f"{'in ' + quantized if quantized else 'in full precision'}; build the LLM with "
            "CausalLM(quantization=lmm.training.lora.quantization_kwargs(lora)) so that both agree"
        )
    targets = lora_targets(module, cfg)
    both = {t.split(".", 1)[0] for t in targets} & set(cfg.train_parts)
    if both:
        raise ValueError(
            f"parts {sorted(both)} are in lora.train_parts and hold LoRA targets: their weights "
            "would train twice. Remove them from train_parts or exclude them from lora.target"
        )
    if quantized:
        _no_cpu_packing(module.model.llm.model)
        prepare_model_for_kbit_training(module.model.llm.model, use_gradient_checkpointing=False)
    inject_adapter_in_model(cfg.peft_config(targets), _root(module), adapter_name=ADAPTER)
    for name, part in parts.items():  # peft froze every part's non-adapter weights
        if name in cfg.train_parts:
            part.requires_grad_(True)
    module.lora_config = cfg
    counts = trainable_counts(module)
    total = sum(
        p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in module.parameters()
    )
    log.info(
        "LoRA r=%d alpha=%d%s on %d modules%s; trainable %s of %d parameters",
        cfg.r,
        cfg.alpha,
        " (DoRA)" if cfg.dora else "",
        len(targets),
        f", {quantized} base" if quantized else "",
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        total,
    )
    return targets


def trainable_counts(module) -> dict[str, int]:
    """Trainable parameter counts: `lora`, then each part's other trainable parameters."""
    counts = {"lora": 0}
    for name, p in _root(module).named_parameters():
        if p.requires_grad:
            key = "lora" if _is_lora_param(name) else name.split(".", 1)[0]
            counts[key] = counts.get(key, 0) + p.numel()
    return counts


def _saved_key(name: str) -> str:  # ...q_proj.lora_A.default.weight -> ...q_proj.lora_A.weight
    return re.sub(rf"(\.lora_\w+)\.{ADAPTER}(?=\.|$)", r"\1", name)


def _adapter_params(root: nn.Module) -> dict[str, nn.Parameter]:
    return {_saved_key(k): p for k, p in root.named_parameters() if _is_lora_param(k)}


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP2 shards (DTensors) are gathered (a collective)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def adapter_state_dict(module) -> dict[str, torch.Tensor]:
    """The adapter weights keyed `{part}.{path}.lora_A.weight` (peft style, no adapter name).

    Under FSDP2 every rank must call it (the shards are gathered)."""
    return {k: _full(p) for k, p in _adapter_params(_root(module)).items()}


def _trainable_params(root: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in root.named_parameters() if p.requires_grad and not _is_lora_param(k)}


def non_lora_trainables(module) -> dict[str, torch.Tensor]:
    """Every trainable parameter that is not an adapter's, keyed `{part}.{path}` (with a score
    head's, `score.*`). Under FSDP2 every rank must call it (the shards are gathered)."""
    return {k: _full(p) for k, p in _trainable_params(_saved_root(module)).items()}


def save_adapter(module, out_dir: str | Path) -> Path:
    """Write the adapter, the non-LoRA trainables and the config to `out_dir` (each file atomically).

    Under FSDP2 (or any process group) every rank calls it: the shards are gathered, rank 0
    writes.
    """
    cfg = getattr(module, "lora_config", None)
    if cfg is None or not has_lora(module):
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to save; call apply_lora")
    out = Path(out_dir)
    meta = {"format": "lmm-lora/1", "config": asdict(cfg), "targets": _adapted_names(module)}
    states = (
        (ADAPTER_FILE, adapter_state_dict(module)),
        (TRAINABLES_FILE, non_lora_trainables(module)),
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, state in states:  # with each tensor's hash (load_adapter checks them)
        save_safetensors(state, out / name)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / CONFIG_FILE)
    return out


def _adapted_names(module) -> list[str]:
    return [n for n, m in _root(module).named_modules() if isinstance(m, BaseTunerLayer)]


def load_adapter(module, in_dir: str | Path) -> None:
    """Load an adapter directory into `module`, applying LoRA first (from the saved config) if needed."""
    src = Path(in_dir)
    missing_files = [
        f for f in (ADAPTER_FILE, TRAINABLES_FILE, CONFIG_FILE) if not (src / f).is_file()
    ]
    if missing_files:
        raise FileNotFoundError(
            f"{src} is not an lmm adapter directory: missing {missing_files} (save_adapter writes them)"
        )
    meta = json.loads((src / CONFIG_FILE).read_text())
    if not has_lora(module):
        apply_lora(module, LoraConfig(**meta["config"]))
    adapted = _adapted_names(module)
    if adapted != meta["targets"]:
        extra, lacking = set(adapted) - set(meta["targets"]), set(meta["targets"]) - set(adapted)
        raise ValueError(
            f"adapter {src} was trained on other modules than this model adapts: only in the model "
            f"{sorted(extra)[:4]}, only in the adapter {sorted(lacking)[:4]}; use the training "
            "LoRA config (lora.target / lora.exclude)"
        )
    adapter = load_safetensors(src / ADAPTER_FILE)  # hashes checked: CheckpointError if altered
    _copy_into(_adapter_params(_root(module)), adapter, src / ADAPTER_FILE)
    trainables = _trainable_params(_saved_root(module))
    _copy_into(trainables, load_safetensors(src / TRAINABLES_FILE), src / TRAINABLES_FILE)


@torch.no_grad()
def _copy_into(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor], path) -> None:
    """Copy `saved` into `params` after checking that names and shapes agree."""
    if set(saved) != set(params):
        unexpected, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise ValueError(
            f"{path}: names do not match the model's: {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]}); load it "
            "into a model built like the trained one (same parts, lora.train_parts, targets)"
        )
    for name, tensor in saved.items():
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model's "
                f"{tuple(params[name].shape)}; was it trained with another r or model size?"
            )
        params[name].copy_(tensor)


def _unload(root: nn.Module, merge: bool) -> None:
    """Replace every adapted layer by its base layer, merging the adapter into it first if asked."""
    for name, sub in list(root.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            if merge:
                sub.merge(safe_merge=True)
            root.set_submodule(name, sub.get_base_layer())


def merge_lora(module, dtype: str | None = None) -> None:
    """Fold the adapters into the base weights and remove them (for export).

    A quantized (4-bit or int8) LLM is first dequantized (to `dtype`, default the dtype it
    was loaded in) and the adapters merged in that precision — exact up to float rounding,
    unlike merging into 4-bit weights and quantizing again. The LLM is then a plain
    transformers model without a quantization config.
    """
    if not has_lora(module):
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to merge")
    root = _root(module)
    llm = module.model.llm.model
    if _quantization(llm):
        _no_cpu_packing(llm)
        adapter = {k: v.clone() for k, v in adapter_state_dict(module).items()}
        peft_cfg = _peft_config_of(root)
        _unload(root, merge=False)
        llm.dequantize(dtype=_dtype(dtype) if dtype else None)
        inject_adapter_in_model(peft_cfg, root, adapter_name=ADAPTER)
        _copy_into(_adapter_params(root), adapter, "the adapter being merged")
        log.info("dequantized the LLM before merging the adapters")
    _unload(root, merge=True)
    module.lora_config = None


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def _peft_config_of(root: nn.Module) -> PeftLoraConfig:
    """The peft config that re-creates the adapters found in `root` (names, rank, scale, DoRA)."""
    layers = {n: m for n, m in root.named_modules() if isinstance(m, BaseTunerLayer)}
    first = next(iter(layers.values()))
    return PeftLoraConfig(
        r=first.r[ADAPTER],
        lora_alpha=first.lora_alpha[ADAPTER],
        lora_dropout=0.0,
        target_modules=list(layers),
        use_dora=first.use_dora[ADAPTER],
        bias="none",
    )
