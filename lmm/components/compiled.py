"""Compiled decoder layers: each layer of a causal LM under `torch.compile`, attention left eager.

Inductor fuses what runs between a layer's matmuls (RMSNorm, rotary, SiLU · up, residual adds,
the casts around them, and their backward) into a few generated kernels; the matmuls stay
torch's. Attention is not traced: lmm's packed attention splits rows by their position ids on
the host (a data-dependent loop dynamo would recompile for every packing), so the layer's graph
breaks around it and runs it as it is (`lmm.components.attention` registers it under
`torch.compiler.disable`). One compilation serves every layer (the layers share
their code; with transformers' inlined modules the weights are graph inputs) and every row
length (`dynamic=True`).

Compiled code is cached by inductor (its FX graph and AOTAutograd caches, under
`TORCHINDUCTOR_CACHE_DIR`, default `/tmp/torchinductor_<user>`), so a second run of the same
model compiles in a fraction of the first's time. On the CPU inductor needs a C++ compiler;
without one the layers stay eager, with a warning.
"""

from __future__ import annotations

import functools
import shutil

import torch
from torch import nn

from lmm.components.flops import layer_list
from lmm.utils.logging import get_logger

log = get_logger(__name__)


@functools.lru_cache(maxsize=1)
def cpu_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (`torch._inductor.config.cpp.cxx`),
    or None when none is on the PATH."""
    from torch._inductor import config

    candidates = [c for c in config.cpp.cxx if c] or ["g++"]
    for name in candidates:
        if shutil.which(name):
            return name
    return None


def can_compile(device: torch.device | str) -> bool:
    """Whether inductor can generate kernels for `device`: a C++ compiler on the CPU; CUDA
    (Triton) elsewhere."""
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_compiler() is not None
    return kind == "cuda"


def compile_layers(model: nn.Module, device: torch.device | str = "cpu") -> int:
    """Compile each decoder layer of `model` (a transformers causal LM) in place with inductor,
    dynamic in the sequence length; return how many were compiled (0: none, inductor cannot run
    on `device`, a warning says why). Compilation itself happens at the first forward."""
    if not can_compile(device):
        log.warning(
            "compiled layers: inductor cannot generate kernels for %s (on the CPU: no C++ "
            "compiler on the PATH); the layers run eager. Fix: install g++ (or name yours in "
            "torch._inductor.config.cpp.cxx), or leave compile off",
            torch.device(device).type,
        )
        return 0
    layers = layer_list(model)
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiled %d decoder layers (inductor, attention eager)", len(layers))
    return len(layers)
