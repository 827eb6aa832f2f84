"""Sharding: the FSDP2 plan applied in `configure_model` under Lightning's ModelParallelStrategy.

Lightning's `FSDPStrategy` (FSDP1) refuses the CPU; `ModelParallelStrategy` with
`torch.distributed.fsdp.fully_shard` runs on CPU (gloo) and GPU (NCCL), so the same plan is
tested here with 2 processes and runs on clusters. Units: every vision encoder layer, the
vision tower, every LLM decoder layer, then the family model as the root (embeddings,
connector, lm_head). Frozen parameters are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lmm.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class FSDP2Config:
    """How `fully_shard` is applied (recipe: `model.init_args.fsdp`)."""

    mixed_precision: str = (
        "auto"  # auto: bf16 params + fp32 reduce on CUDA, fp32 on CPU; or bf16 / fp32
    )
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    reshard_after_forward: bool = True  # ZeRO-3 style; False keeps params gathered (ZeRO-2 style)


def mp_policy(config: FSDP2Config, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 gradient reduction on GPU (or when asked), else fp32 throughout."""
    bf16 = config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and device.type == "cuda"
    )
    if config.mixed_precision not in ("auto", "bf16", "fp32"):
        raise ValueError(
            f"mixed_precision must be auto, bf16 or fp32, got {config.mixed_precision!r}"
        )
    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def layer_list(
    module: nn.Module, names: tuple[str, ...] = ("layers", "h", "blocks")
) -> nn.ModuleList:
    """The first `nn.ModuleList` named like a stack of transformer layers inside `module`."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.split(".")[-1] in names and len(child):
            return child
    raise ValueError(
        f"no transformer layer list ({', '.join(names)}) found in {type(module).__name__}"
    )


def apply_fsdp2(
    root: nn.Module,
    vision: nn.Module | None,
    llm: nn.Module,
    mesh: DeviceMesh,
    config: FSDP2Config,
) -> None:
    """Shard `root` (the family model) in place: vision layers, vision tower, decoder layers, root."""
    policy = mp_policy(config, mesh.device_type and torch.device(mesh.device_type))
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
    if config.activation_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if vision is not None:
        for layer in layer_list(vision):
            fully_shard(layer, **kwargs)
        fully_shard(vision, **kwargs)
    decoder = layer_list(llm)
    for layer in decoder:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    log.info(
        "FSDP2: sharded %d decoder layers%s over %d ranks (%s)",
        len(decoder),
        " and the vision tower" if vision is not None else "",
        mesh.size(),
        "bf16 params, fp32 reduce" if policy.param_dtype == torch.bfloat16 else "fp32",
    )
