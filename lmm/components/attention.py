"""Choose the attention kernel: flash-attn 2 on CUDA when installed, else sdpa, else eager."""

from __future__ import annotations

import importlib.util

import torch

from lmm.utils.logging import get_logger

log = get_logger(__name__)
_logged: set[str] = set()


def resolve_attention(requested: str = "auto") -> str:
    """Return the `attn_implementation` to pass to transformers for `requested`.

    `auto` picks `flash_attention_2` when CUDA is available and `flash_attn` imports, else `sdpa`.
    An explicit `flash_attention_2` without CUDA or the package falls back to `sdpa` with a warning.
    """
    has_flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        choice = "flash_attention_2" if has_flash else "sdpa"
    elif requested == "flash_attention_2" and not has_flash:
        log.warning("flash_attention_2 needs CUDA and the flash-attn package; using sdpa instead")
        choice = "sdpa"
    else:
        choice = requested
    if choice not in _logged:
        _logged.add(choice)
        log.info("attention implementation: %s", choice)
    return choice
