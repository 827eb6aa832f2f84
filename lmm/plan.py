"""`lmm plan`'s model side: a recipe's model built at full size on the meta device (no weights,
no network; `lmm.published` stands in for hub files that are not here) and its parameters
counted per part."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import lmm.published as published
from lmm.components.attention import MATMUL_MAX_LENGTH
from lmm.components.flops import layer_list, matmul_params, trains
from lmm.components.pretrained import empty_init
from lmm.families.registry import family
from lmm.training.module import LMMModule
from lmm.training.recipe import build_module
from lmm.utils.errors import UserError
from lmm.utils.logging import get_logger

log = get_logger(__name__)

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
    with tempfile.TemporaryDirectory(prefix="lmm-plan-") as tmp:
        config["model"] = _stand_in_imports(config["model"], Path(tmp))
        with empty_init(every_rank=True, published=True):
            return build_module(config, where)


def _stand_in_imports(node, tmp: Path):
    """`node` (a recipe section) with each import folder it names that is not here
    (`lmm.published.IMPORTS`, e.g. `checkpoints/fuyu-8b/llm`) pointed at a stand-in under
    `tmp`: the configs and a stub tokenizer of the hub model it is imported from, written in
    the layout that family's import writes (no weights)."""
    if isinstance(node, dict):
        return {k: _stand_in_imports(v, tmp) for k, v in node.items()}
    if isinstance(node, list):
        return [_stand_in_imports(v, tmp) for v in node]
    if not isinstance(node, str):
        return node
    for folder, (hub_id, family_name) in published.IMPORTS.items():
        if (node == folder or node.startswith(folder + "/")) and not Path(folder).exists():
            out = tmp / hub_id.replace("/", "__")
            if not out.exists():
                _write_stand_in(hub_id, family_name, out)
                log.info("%s: not here; its import of %s stands in (sizes only)", folder, hub_id)
            return str(out) + node.removeprefix(folder)
    return node


def _write_stand_in(hub_id: str, family_name: str | None, out: Path) -> None:
    config, tokenizer = published.config(hub_id), published.stub_tokenizer(hub_id)
    if family_name is None:  # a plain transformers folder
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    else:
        family(family_name).convert().write_layout_configs(config, tokenizer, out)


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


# --- memory per GPU -------------------------------------------------------------------------

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator type: its memory, its dense bf16 tensor-core peak, and the bandwidth
    one GPU sends at (each direction) to the GPUs of its node and to other nodes."""

    memory: float  # bytes
    peak_flops: float  # dense bf16 FLOP/s (no sparsity)
    source: str
    node_link: float = 0.0  # bytes/s per GPU inside a node (NVLink; PCIe without it)
    network: float = 25e9  # bytes/s per GPU between nodes: one 200 Gb/s NIC per GPU (assumed)
    per_node: int = 8


# NVIDIA datasheets (dense bf16, no structured sparsity; SXM parts). NVLink: A100 600 GB/s and
# H100/H200 900 GB/s in both directions together (half each way); L40S has none (PCIe Gen4
# x16, 32 GB/s each way). Between nodes: 200 Gb/s HDR InfiniBand per A100/L40S, 400 Gb/s NDR
# per H100/H200 — the common DGX/HGX layout, an assumption about the cluster.
GPUS = {
    "A100-40G": GPU(40 * GIB, 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS", 300e9),
    "A100-80G": GPU(80 * GIB, 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS", 300e9),
    "H100-80G": GPU(
        80 * GIB, 989e12, "NVIDIA H100 SXM datasheet: BF16 1979 TFLOPS sparse", 450e9, 50e9
    ),
    "H200-141G": GPU(
        141e9, 989e12, "NVIDIA H200 SXM datasheet: BF16 1979 TFLOPS sparse", 450e9, 50e9
    ),
    "L40S-48G": GPU(48e9, 362e12, "NVIDIA L40S datasheet: BF16 362 TFLOPS (733 sparse)", 32e9),
}
# What a process can allocate for tensors: the CUDA context, NCCL buffers and the caching
# allocator's fragmentation take the rest (an assumption, not a measurement).
USABLE = 0.9
# bitsandbytes NF4: 4 bits per weight plus one fp32 absmax per block of 64 (double
# quantization shrinks the absmax to 8 bits + a second-level fp32 per 256 blocks).
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
# Gated MLP (SwiGLU / GeGLU: gate, up, act, product) against a plain one (fc1, act).
GATED = ("llama", "mistral", "qwen2", "qwen2_5_vl_text", "gemma", "gemma2", "qwen3")


# One model FLOPs utilisation for every estimate, of the compute alone (communication that
# does not hide behind it is added apart, `epoch_time`). Assumed, not fitted per run: 0.3, what
# 2023-24 multimodal fine-tuning code (HF Trainer + DeepSpeed ZeRO, flash-attn, activation
# checkpointing, unpacked batches) reaches on A100s — below the 0.4-0.5 of tuned LLM
# pre-training, since data loading, image preprocessing and padding are not hidden.
MFU = 0.3


def row_flops(module: LMMModule, tokens: int) -> float:
    """Training FLOPs (forward + backward) of one row of `tokens` text tokens, counted as the
    throughput monitor counts them (`FamilyModel.step_flops`): the row as one causal
    sequence (packed rows of several samples attend less) and no image views (the vision
    tower's FLOPs need the data's image counts: `lmm data check`)."""
    from types import SimpleNamespace

    mask = torch.ones(1, tokens, dtype=torch.bool)
    batch = SimpleNamespace(
        num_tokens=tokens, seq_lens=[[tokens]], attention_mask=mask, pixel_values=None
    )
    return float(module.model.step_flops(batch, None))


class PlanError(UserError, ValueError):
    """A `lmm plan` argument that cannot be read."""


@dataclass(frozen=True)
class DataStats:
    """One epoch of training data, as FLOPs need it (`lmm data check` counts it from a data
    file; a statistics file states it for data that is not on this machine). Either `tokens`
    and `feature_slots` (counted for one model), or `text_tokens` and `images` (views per
    sample: any model, `for_model` gives its feature slots)."""

    samples: int  # samples trained per epoch (after the mixture's balancing)
    tokens: float | None = None  # mean LLM tokens per sample: text + media feature slots
    feature_slots: float | None = None  # mean media feature slots (tokens the vision side hands)
    mean_square: float | None = None  # mean of tokens² per sample (attention); None: tokens²
    text_tokens: float | None = None  # mean text tokens per sample
    images: float | None = None  # mean image views per sample (a video: its frames)
    source: str = ""

    @property
    def square(self) -> float:
        return self.mean_square if self.mean_square is not None else self.tokens**2

    def for_model(self, module: LMMModule) -> DataStats:
        """Counted for `module`: `images` x the feature slots one of its views hands on."""
        if self.tokens is not None:
            return self
        slots = self.images * module.model.vision_tokens()[1]
        return replace(self, tokens=self.text_tokens + slots, feature_slots=slots)


STATS_KEYS = {
    "samples",
    "tokens",
    "feature_slots",
    "mean_square",
    "text_tokens",
    "images",
    "source",
}
# Statistics of the seeds' published datasets (lmm/published/data/*.yaml, sources inside):
# `--data llava_v1_5_mix665k` plans a recipe on data that is not on this machine.
SHIPPED = Path(__file__).parent / "published" / "data"


def shipped_stats() -> list[str]:
    """The names of the statistics files lmm ships."""
    return sorted(f.stem for f in SHIPPED.glob("*.yaml"))


def read_stats(path: str, config: Mapping, where: str) -> DataStats:
    """`--data`: a statistics file (YAML/JSON with `samples`, `tokens`, `feature_slots`), or a
    data file / mixture YAML counted as `lmm data check` counts it with the recipe's own
    processor (tokens of the model's tokenizer, feature slots of its media spec)."""
    import yaml

    file = Path(path)
    if not file.exists() and (SHIPPED / f"{path}.yaml").is_file():
        file = SHIPPED / f"{path}.yaml"
    elif not file.exists() and "{" not in path:
        raise PlanError(
            f"--data {path}: no such file. Fix: give a data file, a mixture YAML, a statistics "
            f"file (samples, tokens, feature_slots) or one lmm ships: {', '.join(shipped_stats())}"
        )
    if file.suffix in (".yaml", ".yml", ".json") and file.is_file():
        loaded = yaml.safe_load(file.read_text())
        if isinstance(loaded, Mapping) and "samples" in loaded:
            unknown = set(loaded) - STATS_KEYS
            given = set(loaded)
            missing = min(
                ({"samples", "tokens", "feature_slots"} - given),
                ({"samples", "text_tokens", "images"} - given),
                key=len,
            )
            if unknown or missing:
                raise PlanError(
                    f"--data {path}: a statistics file "
                    + (f"with unknown keys {sorted(unknown)}" if unknown else "")
                    + (f"{' and ' if unknown else ''}without {sorted(missing)}" if missing else "")
                    + ". Fix: give samples with tokens and feature_slots, or with text_tokens and "
                    f"images (keys: {', '.join(sorted(STATS_KEYS))})"
                )
            return DataStats(**{"source": str(path), **loaded})
    if file.parent == SHIPPED:
        raise PlanError(f"{file}: not a statistics file (no `samples`)")
    return count_stats(path, config, where)


def count_stats(path: str, config: Mapping, where: str) -> DataStats:
    """A data file or mixture counted with `lmm.data.check.check` (headers only: lengths need no
    decoding) and the processor `lmm fit` would build for the recipe."""
    import io

    from lmm.data.check import check, load_template, recipe_data
    from lmm.data.templates import ChatTemplate
    from lmm.training.recipe import model_processor

    recipe = recipe_data(dict(config))
    template = recipe.get("template") or "lmm.data.templates.Llama3"
    template = template if isinstance(template, ChatTemplate) else load_template(template)
    max_length = recipe.get("max_length") or 2048
    processor = model_processor(
        dict(config), template, max_length, recipe.get("preprocessing"), where
    )
    if processor is None:
        raise PlanError(
            f"--data {path}: its tokens cannot be counted: the recipe's tokenizer is not on this "
            "machine. Fix: point the recipe at it (--model.init_args.tokenizer=DIR) or give a "
            "statistics file (samples, tokens, feature_slots: `lmm data check` prints them)"
        )
    keys = ("max_frames", "fps", "labels", "seed", "root")
    report = check(
        path,
        processor=processor,
        fast=True,
        out=io.StringIO(),
        **{k: recipe[k] for k in keys if recipe.get(k) is not None},
    )
    tokens = report["tokens"]
    if tokens is None:
        raise PlanError(f"--data {path}: no usable record to count. Fix: `lmm data check {path}`")
    samples = sum(report["images"]["histogram"].values())
    return DataStats(
        samples,
        tokens=tokens["mean"],
        feature_slots=tokens["feature_slots_mean"],
        mean_square=tokens["mean_square"],
        source=str(path),
    )


def sample_flops(module: LMMModule, stats: DataStats) -> float:
    """Training FLOPs (forward + backward) of the mean sample, counted as the throughput
    monitor counts a batch (`FamilyModel.step_flops`) with the vocabulary projection at every
    position: the LLM on `tokens`, attention on `mean_square`, and the vision tower and
    connector on `feature_slots / h` views, h the feature slots one view hands on (anyres
    tiles and video frames are views alike; pooled video frames hand on fewer, so this
    undercounts them)."""
    from types import SimpleNamespace

    _, handed = module.model.vision_tokens()
    views = stats.feature_slots / handed if handed else 0.0

    def flops(n_views: int) -> float:
        pixels = SimpleNamespace(shape=(n_views,)) if n_views else None
        batch = SimpleNamespace(
            num_tokens=stats.tokens,
            seq_lens=[[stats.square**0.5]],
            attention_mask=None,
            pixel_values=pixels,
        )
        return float(module.model.step_flops(batch, None))

    base = flops(0)
    return base + views * (flops(1) - base) if views else base


def parse_gpus(spec: str) -> tuple[int, str]:
    """`16xA100-40G` -> (16, "A100-40G")."""
    count, _, name = spec.partition("x")
    if not count.isdigit() or int(count) < 1 or name not in GPUS:
        raise PlanError(
            f"--gpus {spec!r}: expected COUNTxTYPE with TYPE one of {', '.join(GPUS)}. "
            "Fix: e.g. --gpus 16xA100-40G"
        )
    return int(count), name


@dataclass(frozen=True)
class Runtime:
    """Where a training step runs, as the facts that change what it keeps for its backward
    pass. What one layer keeps (`activation_bytes`) is one count everywhere; these fill in
    its dtypes and the kernels' extras."""

    param_bytes: int  # the parameters' dtype in the forward: the residual stream's dtype
    weight_copies: bool  # autocast's bf16 copy of each fp32 weight, kept until its backward
    scores_up_to: int  # attention keeps its bf16 probabilities for samples up to this long
    source: str


# FSDP2 on CUDA: bf16 parameters (`mp_policy`), flash-attn (O(tokens) statistics only).
GPU_RUNTIME = Runtime(2, False, 0, "FSDP2 bf16 parameters, flash-attn")
# The CPU (lmm's tests and benchmarks): fp32 parameters under bf16 autocast (`mp_policy` keeps
# fp32 off CUDA), `matmul_attention` for samples up to MATMUL_MAX_LENGTH tokens.
CPU_RUNTIME = Runtime(4, True, MATMUL_MAX_LENGTH, "fp32 parameters, bf16 autocast, CPU kernels")
# Families whose layers normalize with transformers' RMSNorm (the others: LayerNorm).
RMS_NORM = GATED
# Families whose attention and MLP read one norm's output (`x + attn(ln(x)) + mlp(ln(x))`).
PARALLEL = ("phi",)
# Tensors of the MLP's width an activation keeps, its input included: torch's own kernels
# (silu, gelu, gelu_pytorch_tanh) keep their input; transformers' composed ones more.
ACTIVATION_KEEPS = {"quick_gelu": 2, "gelu_new": 4, "gelu_fast": 4}


def activation_bytes(config, param_bytes: int = 2, trained: bool = True) -> float:
    """Bytes per token that one decoder (or encoder) layer keeps for its backward pass, with
    bf16 matmuls, a fused attention kernel (O(tokens) statistics, not the L×L scores; a
    kernel that keeps them is `Runtime.scores_up_to`) and no activation checkpointing.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    eq. 1) count `s·b·h·(34 + 5·a·s/h)` bytes per GPT layer with fused norms. transformers'
    layers keep more; counted tensor by tensor (`torch.autograd.graph.saved_tensors_hooks`
    on the CPU: tests/plan/test_plan_memory.py), with h = hidden, kv = key/value width
    (grouped-query), I = MLP width, p = `param_bytes` (the residual stream's dtype):
        each of the 2 norms (1 in Phi's parallel block): RMSNorm its fp32 input (a copy
            when p = 2) and its normalized output in the stream's dtype, (4 + p)·h;
            LayerNorm its fp32 input, 4h (and their fp32 statistics, 4-8 bytes)
        attention: its input in bf16, once, or once per q/k/v projection when the norm's
            output is not bf16 (autocast casts it for each: fp32 stream, or LayerNorm);
            q h, k kv, v kv as the kernel keeps them, its output h, o_proj's input h
        MLP: its input (gate and up: two casts, as above); gated (Llama, Qwen2, Gemma:
            gate, up, act(gate), product) 4I; plain (SigLIP: fc1 out, act) 2I; an
            activation composed of several ops keeps more (`ACTIVATION_KEEPS`: Phi's
            gelu_new 3I, CLIP's quick_gelu I)
    e.g. Llama-3-8B on GPUs (p = 2, kv = h/4, I = 3.5h): 12h + 2·(4h + 2kv) + 2·(h + 4I)
    = 51 bytes per token per h; Phi-2 (one LayerNorm, gelu_new, kv = h, I = 4h):
    4h + 2·(6h + 2kv) + 2·(h + 5I) = 62.
    A frozen layer (`trained=False`: no weight gradients, only the activation gradients a
    trained part before it needs) keeps none of the matmul inputs that serve weight gradients
    alone: not the q/k/v and MLP input casts, o_proj's input, the down projection's input,
    nor RMSNorm's normalized output: 34 bytes per token per h for Llama-3-8B on GPUs, 44 for
    Phi-2."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = h * (getattr(config, "num_key_value_heads", None) or heads) / heads
    width = config.intermediate_size
    gated = config.model_type in GATED
    rms = config.model_type in RMS_NORM
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    act_keeps = ACTIVATION_KEEPS.get(act, 1)
    casts = param_bytes != 2 or not rms  # the norm's output is not bf16: cast per projection
    # each norm's input and output as above, and its fp32 statistics (RMSNorm's rsqrt,
    # LayerNorm's mean and rstd): 4-8 bytes per token
    norm = ((4 + param_bytes * trained) * h + 4) if rms else (4 * h + 8)
    norms = (1 if config.model_type in PARALLEL else 2) * norm
    attention = ((3 * h if casts else h) + h) * trained + h + 2 * kv + h
    # the activation's kept tensors, then: gated the up projection, act(gate), the product
    mlp = (2 * h if casts and gated else h) * trained
    mlp += (act_keeps + (2 if gated else 0) + trained) * width
    return norms + 2 * (attention + mlp)


def activation_constant(config, param_bytes: int = 2) -> float:
    """`activation_bytes` per hidden unit: the c of `tokens·h·c` per layer."""
    return activation_bytes(config, param_bytes) / config.hidden_size


def _text_config(module):
    config = module.model.config
    return getattr(config, "text_config", None) or config


def _part_params(part) -> list:
    return list(part.parameters()) if part is not None else []


def state_bytes(module: LMMModule, shards: int, quantized: dict | None = None) -> dict[str, float]:
    """Bytes per GPU of the training state, `shards` ways (FSDP2; 1: DDP or one process).

    - `parameters`: every parameter in its own dtype; a quantized LLM's decoder-layer Linear
      weights at NF4 bytes (`NF4_BYTES`).
    - `gradients`: the trainable parameters' gradients, in the parameter's dtype (FSDP2
      reduces in fp32 and stores the shard in the parameter's dtype).
    - `optimizer`: AdamW's two moments per trainable parameter (the parameter's dtype)."""
    llm = module.model.parts().get("llm")
    quant_ids: set[int] = set()
    if quantized is not None:
        for layer in layer_list(llm):
            for name, m in layer.named_modules():
                if isinstance(m, nn.Linear) and ".lora_" not in f".{name}":
                    quant_ids.add(id(m.weight))
    nf4 = NF4_BYTES[bool(quantized and quantized.get("bnb_4bit_use_double_quant"))]
    params = grads = 0.0
    for p in module.parameters():
        params += p.numel() * (nf4 if id(p) in quant_ids else p.element_size())
        grads += p.numel() * p.element_size() if p.requires_grad else 0
    return {
        "parameters": params / shards,
        "gradients": grads / shards,
        "optimizer": 2 * grads / shards,
    }


def memory_per_gpu(
    module: LMMModule,
    gpus: int,
    sharded: bool,
    rows: int,
    tokens: int,
    checkpointing: bool,
    quantized: dict | None = None,
    runtime: Runtime = GPU_RUNTIME,
    samples: list[int] | None = None,
    labeled: int | None = None,
    image_tokens: int = 0,
) -> dict[str, float]:
    """Bytes per GPU at the peak of a training step: what is alive then, by kind; `total` is
    their sum.

    The backward pass walks the decoder layers from the last down, turning each layer's kept
    activations into its gradients, so the peak is the larger of two moments (the count is
    linear in the layer between them): the last layer's backward (every layer's activations
    kept; with checkpointing the last one recomputed) or the first layer's (every LLM
    gradient made; one layer's activations).
    - `parameters`, `gradients`, `optimizer`: `state_bytes`, ÷ `gpus` under FSDP2 (sharded);
      the gradients are those made by the peak (the non-layer ones counted throughout), plus
      the running layer's: under FSDP2 unsharded, with the flat fp32 copy FSDP2 makes of them
      for the reduce-scatter (`foreach_reduce`).
    - `gathered` (FSDP2): the root's parameters (FSDP2 keeps them unsharded through the step)
      and the unsharded parameters of three decoder layers (the running one, the prefetched
      one, and the flat all-gather buffer it is copied out of: `foreach_all_gather`), in
      `runtime.param_bytes`.
    - `activations`: per LLM layer `tokens·activation_bytes(config, runtime.param_bytes)`;
      with `runtime.weight_copies` a bf16 copy of its Linear weights; with
      `runtime.scores_up_to`, `heads·n²` bf16 probabilities per sample of n tokens up to that
      length (`samples`: the lengths of the packed samples, default one per row). With
      checkpointing a layer keeps its input (`tokens·h·param_bytes`) and one layer's full
      activations exist while it is recomputed. A trained vision tower keeps its layers' for
      `image_tokens` (checkpointing recomputes the LLM's layers only); a frozen one none (no
      graph); the final norm's too.
    - `logits`: at the last layer's backward, bf16 and their fp32 copy for the loss,
      `6·labeled·V` (`labeled`: trained positions, where lmm computes logits; default every
      token, an upper bound: the recipe alone does not tell).
    """
    parts = module.model.parts()
    llm, vision = parts.get("llm"), parts.get("vision")
    config = _text_config(llm)
    layers = layer_list(llm)
    shards = gpus if sharded else 1
    state = state_bytes(module, shards, quantized)
    pb = runtime.param_bytes
    n, h, vocab = len(layers), config.hidden_size, config.vocab_size
    row_tokens = rows * tokens
    labeled = row_tokens if labeled is None else labeled
    lengths = samples if samples is not None else [tokens] * rows

    def full_layer(cfg, layer: nn.Module, count: int, lengths: list[int]) -> float:
        """What a layer keeps without checkpointing for `count` tokens in samples `lengths`."""
        kept = count * activation_bytes(cfg, pb, trains(layer))
        kept += (
            2 * cfg.num_attention_heads * sum(x * x for x in lengths if x <= runtime.scores_up_to)
        )
        return kept + (2 * matmul_params(layer)[0] if runtime.weight_copies else 0)

    full = full_layer(config, layers[0], row_tokens, lengths)
    keep = row_tokens * h * pb if checkpointing else full
    # outside the layers: the final RMSNorm, the vocabulary projection's bf16 input
    other = (4 + pb) * row_tokens * h + 2 * labeled * h
    copies = matmul_params(module)[0] - n * matmul_params(layers[0])[0]  # head, connector
    if vision is not None:
        copies -= matmul_params(vision)[0]
        vconfig = getattr(getattr(vision, "model", None), "config", None)
        if trains(vision) and image_tokens and vconfig is not None:
            # not checkpointed (`apply_activation_checkpointing` recomputes the LLM's layers)
            other += sum(full_layer(vconfig, x, image_tokens, []) for x in layer_list(vision))
    other += 2 * copies if runtime.weight_copies else 0
    trained = [p for p in layers[0].parameters() if p.requires_grad]
    share = sum(p.numel() * p.element_size() for p in trained) / shards
    rest = state["gradients"] - n * share  # embeddings, head, connector, vision: throughout
    # the running layer's gradients: under FSDP2 whole (in the forward's dtype) and FSDP2's
    # flat fp32 copy of them for the reduce-scatter, until it runs
    running = sum(p.numel() for p in trained) * (pb + 4) if sharded else share
    last = {  # the last layer's backward: every layer's activations, the logits
        "gradients": rest + running,
        "activations": (n - 1) * keep + full + other,
        "logits": 6.0 * labeled * vocab,
    }
    first = {  # the first layer's backward: every gradient made, one layer's activations
        "gradients": state["gradients"] - share + running,
        "activations": full + other,
        "logits": 0.0,
    }
    moment = max((last, first), key=lambda m: sum(m.values()))
    layer_params = sum(p.numel() for p in layers[0].parameters())
    unsharded = sum(p.numel() for p in module.parameters()) - n * layer_params
    if vision is not None:
        unsharded -= sum(p.numel() for p in vision.parameters())
    out = {
        "parameters": state["parameters"],
        "gathered": (unsharded + 3 * layer_params) * pb if sharded else 0.0,
        "gradients": moment["gradients"],
        "optimizer": state["optimizer"],
        "activations": moment["activations"],
        "logits": moment["logits"],
    }
    return {**out, "total": sum(out.values())}


def largest_rows(
    module: LMMModule,
    gpus: int,
    sharded: bool,
    tokens: int,
    checkpointing: bool,
    usable: float,
    quantized: dict | None = None,
) -> int:
    """The most rows of `tokens` whose `memory_per_gpu` total fits in `usable` bytes (0: none)."""

    def fits(rows: int) -> bool:
        total = memory_per_gpu(module, gpus, sharded, rows, tokens, checkpointing, quantized)
        return total["total"] <= usable

    low, high = 0, 1
    while fits(high):  # memory grows with rows: double, then bisect
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# --- time -------------------------------------------------------------------------------------


def communication_bytes(module: LMMModule, gpus: int, sharded: bool) -> tuple[float, float]:
    """(bytes one GPU sends per micro-batch, per optimizer step) for data parallelism.

    FSDP2 / ZeRO-3 (`sharded`): every micro-batch all-gathers the bf16 parameters twice (forward,
    and backward: they are resharded after the forward) and reduce-scatters the trainable
    parameters' gradients in fp32 (`mp_policy`'s reduce dtype). DDP: one all-reduce of the fp32
    gradients per optimizer step (the micro-batches before it accumulate locally). A ring
    collective sends (g-1)/g of the buffer per GPU, twice for an all-reduce."""
    if gpus == 1:
        return 0.0, 0.0
    ring = (gpus - 1) / gpus
    params = sum(p.numel() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if sharded:
        return ring * (2 * 2 * params + 4 * trained), 0.0
    return 0.0, 2 * ring * 4 * trained


def epoch_time(
    module: LMMModule,
    gpu: GPU,
    gpus: int,
    sharded: bool,
    stats: DataStats,
    rows: int,
    pack_tokens: int | None,
    accumulate: int,
    mfu: float = MFU,
) -> dict[str, float]:
    """Seconds per epoch of `stats` on `gpus` GPUs.

    A micro-batch is `rows` samples, or with packing `rows x pack_tokens` tokens of mean-length
    samples. Its compute takes its model FLOPs (`sample_flops`) at `mfu` of the peak; its
    communication (`communication_bytes`) runs at the GPU's NVLink bandwidth inside one node
    and at its network bandwidth across nodes, overlapped with the compute (FSDP prefetches
    the next layer's parameters), so a micro-batch takes the longer of the two."""
    flops = sample_flops(module, stats)
    per_micro = rows * max(1.0, pack_tokens / stats.tokens) if pack_tokens else float(rows)
    micro_steps = stats.samples / (gpus * per_micro)
    bandwidth = gpu.node_link if gpus <= gpu.per_node else gpu.network
    per_micro_bytes, per_step_bytes = communication_bytes(module, gpus, sharded)
    compute = per_micro * flops / (gpu.peak_flops * mfu)
    comm = per_micro_bytes / bandwidth
    step_comm = per_step_bytes / bandwidth
    seconds = micro_steps * max(compute, comm) + micro_steps / accumulate * step_comm
    return {
        "samples": stats.samples,
        "tokens_per_sample": stats.tokens,
        "feature_slots_per_sample": stats.feature_slots,
        "flops_per_sample": flops,
        "samples_per_micro_batch": per_micro,
        "micro_batches_per_gpu": micro_steps,
        "compute_s_per_micro_batch": compute,
        "communication_s_per_micro_batch": comm,
        "communication_s_per_step": step_comm,
        "bandwidth": bandwidth,
        "mfu": mfu,
        "seconds": seconds,
    }


# --- the command ----------------------------------------------------------------------------


def _get(config: Mapping, *keys, default=None):
    for key in keys:
        if not isinstance(config, Mapping) or key not in config:
            return default
        config = config[key]
    return default if config is None else config


@contextmanager
def _offline():
    """huggingface_hub's offline mode for the duration (it reads the variable at import)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def plan(
    config: Mapping,
    gpus: str = "8xH100-80G",
    where: str = "<recipe>",
    data: str | DataStats | None = None,
) -> dict:
    """What the recipe `config` costs at full size on `gpus`: parameters per part, memory per
    GPU with and without activation checkpointing, the largest micro-batch that fits, and with
    `data` (a path for `read_stats`, or `DataStats`) the time of its epochs."""
    count, name = parse_gpus(gpus)
    gpu = GPUS[name]
    llm_args = _get(config, "model", "init_args", "model", "init_args", "llm", "init_args")
    quantized = _get(llm_args, "quantization")
    with _offline():  # sizes only: the shipped facts, no hub request (nor its retries)
        module = meta_module(config, where)
    counts = parameter_counts(module)
    strategy = _get(config, "trainer", "strategy", default="auto")
    strategy = strategy.get("class_path", "") if isinstance(strategy, Mapping) else str(strategy)
    sharded = "fsdp" in strategy.lower()
    data_args = _get(config, "data", "init_args", default={})
    tokens = int(data_args.get("pack_tokens") or data_args.get("max_length") or 2048)
    rows = int(data_args.get("batch_size") or 1)
    recipe_ckpt = bool(_get(config, "model", "init_args", "fsdp", "activation_checkpointing"))
    usable = USABLE * gpu.memory
    memory, largest = {}, {}
    for key, ckpt in (("checkpointing", True), ("no_checkpointing", False)):
        memory[key] = memory_per_gpu(module, count, sharded, rows, tokens, ckpt, quantized)
        largest[key] = largest_rows(module, count, sharded, tokens, ckpt, usable, quantized)
    accumulate = int(_get(config, "trainer", "accumulate_grad_batches", default=1))
    flops = row_flops(module, tokens)
    step = rows * accumulate * flops / (gpu.peak_flops * MFU)
    result = {
        "recipe": where,
        "gpus": {
            "count": count,
            "type": name,
            "memory": gpu.memory,
            "usable": usable,
            "peak_flops": gpu.peak_flops,
        },  # fmt: skip
        "strategy": "fsdp2 (sharded)" if sharded else f"{strategy or 'auto'} (replicated)",
        "parameters": counts,
        "micro_batch": {
            "rows": rows,
            "tokens_per_row": tokens,
            "activation_checkpointing": recipe_ckpt,
        },  # fmt: skip
        "memory_per_gpu": memory,
        "largest_micro_batch": largest,
        "time": {
            "flops_per_row": flops,
            "mfu": MFU,
            "accumulate_grad_batches": accumulate,
            "rows_per_step": rows * accumulate * count,
            "seconds_per_step": step,
        },  # fmt: skip
    }
    if data is not None:
        stats = data if isinstance(data, DataStats) else read_stats(data, config, where)
        stats = stats.for_model(module)
        pack = data_args.get("pack_tokens")
        epoch = epoch_time(module, gpu, count, sharded, stats, rows, pack, accumulate)
        epochs = int(_get(config, "trainer", "max_epochs", default=1))
        result["data"] = {**epoch, "source": stats.source, "epochs": epochs,
                          "hours": epochs * epoch["seconds"] / 3600}  # fmt: skip
    if quantized:
        base = counts["llm"]["parameters"] - counts["llm"]["adapters"]
        nf4 = memory_per_gpu(module, 1, False, 0, 0, False, quantized)["parameters"]
        full = memory_per_gpu(module, 1, False, 0, 0, False, None)["parameters"]
        result["quantized_base"] = {"llm_parameters": base, "bytes": nf4, "bf16_bytes": full}
    return result


def render(result: Mapping) -> str:
    """`lmm plan`'s table."""
    gpus = result["gpus"]
    lines = [
        f"{result['recipe']} on {gpus['count']}x{gpus['type']} "
        f"({gpus['memory'] / GIB:.0f} GiB, {gpus['usable'] / GIB:.1f} usable; "
        f"bf16 peak {gpus['peak_flops'] / 1e12:.0f} TFLOP/s), {result['strategy']}",
        "",
        f"{'part':<12}{'parameters':>14}{'trainable':>14}{'frozen':>14}{'LoRA':>12}",
    ]
    for part, row in result["parameters"].items():
        lines.append(f"{part:<12}" + "".join(f"{row[k]:>14,}" for k in KEYS[:3]))
        lines[-1] += f"{row['adapters']:>12,}"
    if "quantized_base" in result:
        q = result["quantized_base"]
        lines.append(
            f"weights with the LLM's layers in NF4: {q['bytes'] / GIB:.2f} GiB "
            f"(unquantized: {q['bf16_bytes'] / GIB:.2f} GiB)"
        )
    mb = result["micro_batch"]
    lines += [
        "",
        f"memory per GPU, GiB (micro-batch {mb['rows']} x {mb['tokens_per_row']} tokens; "
        f"recipe: checkpointing {'on' if mb['activation_checkpointing'] else 'off'})",
        f"{'':<18}{'checkpointing':>16}{'no checkpointing':>18}",
    ]
    memory = result["memory_per_gpu"]
    for key in ("parameters", "gathered", "gradients", "optimizer", "activations", "logits"):
        on, off = memory["checkpointing"][key], memory["no_checkpointing"][key]
        lines.append(f"{key:<18}{on / GIB:>16.2f}{off / GIB:>18.2f}")
    on, off = memory["checkpointing"]["total"], memory["no_checkpointing"]["total"]
    lines.append(f"{'total':<18}{on / GIB:>16.2f}{off / GIB:>18.2f}")
    largest = result["largest_micro_batch"]
    lines.append(
        f"{'largest micro-batch':<18}{largest['checkpointing']:>16}"
        f"{largest['no_checkpointing']:>18}   rows that fit in the usable memory"
    )
    t = result["time"]
    lines += [
        "",
        f"time: {t['flops_per_row'] / 1e12:.1f} TFLOPs per row (text tokens only), "
        f"{t['seconds_per_step']:.1f} s per optimizer step of {t['rows_per_step']} rows "
        f"at MFU {t['mfu']:.0%}",
    ]
    if "data" in result:
        d = result["data"]
        lines += [
            f"data: {d['source']}: {d['samples']:,} samples per epoch, "
            f"{d['tokens_per_sample']:.0f} tokens per sample ({d['feature_slots_per_sample']:.0f} "
            f"media feature slots), {d['flops_per_sample'] / 1e12:.1f} TFLOPs per sample "
            "(vision tower and connector included)",
            f"  per micro-batch of {d['samples_per_micro_batch']:.1f} samples: compute "
            f"{d['compute_s_per_micro_batch']:.2f} s at MFU {d['mfu']:.0%}, communication "
            f"{d['communication_s_per_micro_batch']:.2f} s at {d['bandwidth'] / 1e9:.0f} GB/s "
            "per GPU (overlapped: the longer counts)",
            f"  {d['seconds'] / 3600:.1f} hours per epoch, {d['hours']:.1f} hours for "
            f"{d['epochs']} epoch{'s' if d['epochs'] != 1 else ''}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    """`lmm plan --config RECIPE [--gpus 16xA100-40G] [--json]`."""
    import argparse
    import json
    import sys
    from pathlib import Path

    import yaml

    parser = argparse.ArgumentParser(
        prog="lmm plan", description="A recipe at full size: parameters and memory per GPU."
    )
    parser.add_argument("--config", required=True, help="a recipe YAML")
    parser.add_argument("--gpus", default="8xH100-80G", help=f"COUNTxTYPE; TYPE: {', '.join(GPUS)}")
    parser.add_argument(
        "--data",
        help="a data file or mixture YAML (counted as `lmm data check` counts it), or a "
        "statistics file (samples, tokens, feature_slots): adds the time per epoch",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object")
    a = parser.parse_args(argv)
    path = Path(a.config)
    if not path.is_file():
        raise PlanError(f"--config {path}: no such file. Fix: give a recipe YAML (recipes/...)")
    result = plan(yaml.safe_load(path.read_text()), a.gpus, str(path), a.data)
    sys.stdout.write(json.dumps(result) + "\n" if a.json else render(result))
    return result
