"""Sharding: the FSDP2 plan applied in `configure_model` under Lightning's ModelParallelStrategy.

Lightning's `FSDPStrategy` (FSDP1) refuses the CPU; `ModelParallelStrategy` with
`torch.distributed.fsdp.fully_shard` runs on CPU (gloo) and GPU (NCCL), so the same plan is
tested here with 2 processes and runs on clusters. Units: every vision encoder layer, the
vision tower, every LLM decoder layer, then the family model as the root (embeddings,
connector, lm_head). Frozen parameters are allowed.

With `meta_init`, ranks other than 0 build the model on the meta device
(`lmm.components.pretrained.empty_init`: no
parameter memory, non-persistent buffers such as rotary frequencies computed as usual); after
sharding, `broadcast_from_rank0` gives every rank its shard of rank 0's weights, so only rank 0
ever holds the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lmm.components.flops import layer_list
from lmm.training.checkpoint import verify_sharded, write_manifest
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
    # Ranks other than 0 build the model on the meta device and receive rank 0's weights after
    # sharding (the `lmm` CLI builds them under `lmm.components.pretrained.empty_init`; in
    # Python, build the module under it).
    meta_init: bool = False


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter of `module` is still on the meta device."""
    return any(p.is_meta for p in module.parameters())


def broadcast_weights(module: nn.Module, full_state: dict | None, device: torch.device) -> None:
    """After sharding: materialise meta parameters on `device` and load rank 0's full state
    dict `full_state` (None on the other ranks) into every rank's shards.

    Buffers keep their values (`to_empty` would leave them uninitialised)."""
    if has_meta(module):
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        module.to_empty(device=device)
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full_state or {}, options=options)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` with every rank in the data-parallel dimension (the
    FSDP2 plan shards over it), whatever the number of nodes and devices.

    `ModelParallelStrategy(data_parallel_size="auto")` means the number of *nodes* (with
    tensor-parallel "auto" = the devices of a node), so `data_parallel_size: auto,
    tensor_parallel_size: 1` fails on one node of several devices; here "auto" is the world size
    divided by `tensor_parallel_size`.

    A sharded checkpoint folder gets a manifest once every rank has written its shards
    (`lmm_hashes.json`: size and hash of every file, by rank 0), checked before a resume reads
    it (`verify_sharded`): a changed, truncated or missing shard is a named `CheckpointError`.
    """

    def __init__(self, tensor_parallel_size: int = 1, **kwargs):
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=tensor_parallel_size, **kwargs
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            world = self.num_processes * self.num_nodes
            if world % self._tensor_parallel_size:
                raise ValueError(
                    f"tensor_parallel_size={self._tensor_parallel_size} does not divide the "
                    f"world size {world} (devices x num_nodes)"
                )
            self._data_parallel_size = world // self._tensor_parallel_size
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None
    ) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if self._save_distributed_checkpoint:  # a folder: one shard file per rank
            # A save over an older folder leaves its manifest until the new one replaces it:
            # a save cut short fails the check instead of passing unchecked.
            self.barrier("lmm_hashes")  # every rank's shards are written
            if self.global_rank == 0:  # its path is the one every rank wrote to (broadcast)
                write_manifest(Path(filepath))

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            verify_sharded(path, self)  # before any shard reaches the model
        return super().load_checkpoint(path, weights_only=weights_only)


if "fsdp2" not in StrategyRegistry:  # `trainer.strategy: fsdp2` in a recipe or on the CLI
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="lmm's FSDP2 plan, every rank data-parallel"
    )


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


def apply_activation_checkpointing(llm: nn.Module) -> None:
    """Recompute every decoder layer of the transformers LM `llm` in the backward pass (what
    `FSDP2Config(activation_checkpointing=True)` applies; benchmarks/memory.py calls it too)."""
    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


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
        apply_activation_checkpointing(llm)
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


def shard_module(module, strategy: ModelParallelStrategy | None, config: FSDP2Config) -> None:
    """Shard an `LMMModule` under ModelParallelStrategy: the family model's FSDP2 plan
    (`FamilyModel.shard`), the objective's parts (a score head) as their own units; with
    `config.meta_init`, then give every rank its shard of rank 0's weights.

    Without the strategy (`None`) only checks that the module was not built on the meta device.
    """
    if strategy is None:
        if has_meta(module):
            raise RuntimeError(
                f"{type(module).__name__} was built on the meta device (fsdp.meta_init on a rank "
                "other than 0) but the strategy is not fsdp2: meta_init needs the FSDP2 plan "
                "(trainer.strategy: fsdp2); drop meta_init for DDP or DeepSpeed"
            )
        return
    full_state = None
    llm = module.model.llm.model
    if config.meta_init and getattr(llm, "is_quantized", False):
        raise ValueError(
            "fsdp.meta_init cannot broadcast a quantized (4-bit / 8-bit) LLM's weights: "
            "each rank quantizes its own copy when it loads; set "
            "model.init_args.fsdp.meta_init: false for QLoRA"
        )
    if config.meta_init and strategy.global_rank == 0:
        if has_meta(module):
            raise RuntimeError(
                "fsdp.meta_init: global rank 0 was built on the meta device, but its "
                "weights are the ones every rank receives; check RANK / NODE_RANK / "
                "LOCAL_RANK in the launcher's environment (lmm.components.pretrained."
                "launched_rank_zero)"
            )
        full_state = module.state_dict()  # the full tensors, before sharding
    mesh = module.device_mesh["data_parallel"]
    module.model.shard(mesh, config)
    policy = mp_policy(config, torch.device(mesh.device_type))
    for part in module.objective.parts().values():  # outside the family model: own units
        fully_shard(part, mesh=mesh, mp_policy=policy)
    if config.meta_init:
        built_on_meta = has_meta(module)
        broadcast_weights(module, full_state, strategy.root_device)
        log.info(
            "FSDP2 meta_init: rank %d %s; weights broadcast from rank 0",
            strategy.global_rank,
            "built on the meta device" if built_on_meta else "loaded the weights",
            extra={"all_ranks": True},
        )
