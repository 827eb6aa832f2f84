"""An LMMModule from a recipe's `model:` section, and a checkpoint's weights loaded into it.

`lmm.load`, `lmm convert` and the tests build modules here (no `lmm.cli` needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from lmm.training.checkpoint import HASHES, checkpoint_error_in, load_checkpoint_file
from lmm.training.module import LMMModule


def build_module(config: Mapping, where: str = "<recipe>") -> LMMModule:
    """Instantiate the `model:` section of a recipe as `lmm fit` would (no `lmm.cli` needed)."""
    if "model" not in config:
        raise ValueError(f"{where}: no `model:` section; expected an lmm recipe")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LMMModule, "model", required=True)
    parsed = parser.parse_object({"model": config["model"]})
    try:
        return parser.instantiate_classes(parsed).model
    except ValueError as err:  # a bad init_from file: its named error, not jsonargparse's
        named = checkpoint_error_in(err)
        if named is None:
            raise
        raise named from None


def module_from_recipe(recipe: str | Path) -> LMMModule:
    """Instantiate the `model:` section of a recipe file (an import's `lmm.yaml` included: its
    `init_from` loads the imported weights that are not in transformers folders)."""
    config = yaml.safe_load(Path(recipe).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{recipe}: not a YAML mapping; expected an lmm recipe")
    return build_module(config, where=str(recipe))


def load_weights(module: LMMModule, checkpoint: Path, recipe: str) -> None:
    """Load a Lightning checkpoint's `state_dict` (or a safetensors file) into `module`, strictly;
    a bad or altered file raises `CheckpointError` (`load_checkpoint_file`)."""
    loaded = load_checkpoint_file(checkpoint)
    loaded.pop(HASHES, None)
    state = loaded.get("state_dict", loaded)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the model of {recipe}: missing "
            f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}; load it with the recipe "
            "it was trained with (recipe=)"
        )
