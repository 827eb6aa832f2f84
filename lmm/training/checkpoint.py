"""Checkpoints: atomic writes, clear errors for truncated files, weights-only loading, stage init.

`AtomicCheckpointIO` writes to a temporary file in the same folder and renames it over the
target, so a process killed mid-write leaves the previous checkpoint intact. Loading always
uses `torch.load(weights_only=True)` and turns a truncated or corrupt file into an error
that names it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from lmm.utils.logging import get_logger

log = get_logger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read."""


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`, or safetensors; a bad file raises `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return {"state_dict": load_file(str(path))}
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile, pickle and safetensors raise several types
        size = path.stat().st_size
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) cannot be read ({type(err).__name__}: {err}); "
            "it is probably truncated (a write was interrupted) or corrupt: resume from an "
            "earlier checkpoint"
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically and loads weights-only with clear errors."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        get_filesystem(path).makedirs(str(path.parent), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path)


def init_from_checkpoint(
    module: nn.Module,
    path: str | Path,
    include: Sequence[str] = (".*",),
    exclude: Sequence[str] = (),
) -> list[str]:
    """Load the weights of `path` whose names match `include` (and no `exclude`) into `module`.

    For stage-wise training, e.g. stage 2 takes the stage-1 connector: `include:
    ["model\\.connector\\..*"]`. Every selected key must exist in `module` with the same
    shape, or the error lists the ones that do not. Returns the loaded names.
    """
    checkpoint = load_checkpoint_file(path)
    state = checkpoint.get("state_dict", checkpoint)
    keep = [
        k
        for k in state
        if any(re.fullmatch(p, k) for p in include) and not any(re.fullmatch(p, k) for p in exclude)
    ]
    if not keep:
        raise ValueError(f"no weight of {path} matches include={list(include)}")
    own = module.state_dict()
    missing = [k for k in keep if k not in own]
    shapes = [k for k in keep if k in own and own[k].shape != state[k].shape]
    if missing or shapes:
        raise ValueError(
            f"{path}: {len(missing)} selected weights are not in the model (e.g. {missing[:3]}), "
            f"{len(shapes)} have another shape (e.g. {shapes[:3]}); check include/exclude"
        )
    module.load_state_dict({k: state[k] for k in keep}, strict=False)
    log.info("initialised %d weights from %s", len(keep), path)
    return keep
