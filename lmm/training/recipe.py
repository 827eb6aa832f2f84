"""An LMMModule from a recipe's `model:` section, and a checkpoint's weights loaded into it.

`lmm.load`, `lmm convert` and the tests build modules here (no `lmm.cli` needed).
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from lmm.data.policy import Preprocessing
from lmm.data.processor import Processor
from lmm.data.templates import ChatTemplate
from lmm.training.checkpoint import HASHES, load_checkpoint_file
from lmm.training.module import CheckpointMismatchError, LMMModule, check_state_fits
from lmm.utils.errors import DataFileError, user_error_in
from lmm.utils.logging import get_logger

log = get_logger(__name__)


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
        named = user_error_in(err)
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
    try:
        check_state_fits(module, state, loaded.get("lmm_model"))
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{checkpoint} (recipe {recipe}): {err}") from None
    module.load_state_dict(state)


# What each command reads: the data module's files and its task lists.
_READS = {
    "fit": (("train", "val"), ("val_tasks",)),
    "validate": (("val",), ("val_tasks",)),
    "test": (("test",), ("test_tasks",)),
    "predict": (("predict",), ()),
}


def _remote(path: str) -> bool:
    return path.startswith("hf:") or "://" in path


def missing_inputs(config, command: str) -> list[str]:
    """The data and benchmark files a command's recipe names that are not on disk, each as
    `data.init_args.KEY: PATH` (checked before any model is built). `config` is the command's
    parsed recipe (anything with `.get("a.b.c")`, or nested dicts)."""

    def get(node, dotted: str):
        for key in dotted.split("."):
            if node is None:
                return None
            node = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
        return node

    files, task_lists = _READS.get(command, ((), ()))
    missing = []
    for split in files:
        path = get(config, f"data.init_args.{split}")
        if isinstance(path, str) and not _remote(path) and not Path(path).exists():
            if not glob.glob(path):  # `{a,b}` braces are checked by the mixture reader
                missing.append(f"data.init_args.{split}: {path}")
    for key in task_lists:
        for k, task in enumerate(get(config, f"data.init_args.{key}") or []):
            args = get(task, "init_args") or {}
            name = get(args, "benchmark") or get(args, "name") or f"#{k}"
            path, root = get(args, "path"), get(args, "root")
            if isinstance(path, str) and not _remote(path) and not glob.glob(path):
                missing.append(f"data.init_args.{key}[{k}] ({name}) path: {path}")
            if isinstance(root, str) and not _remote(root) and not Path(root).is_dir():
                missing.append(f"data.init_args.{key}[{k}] ({name}) root: {root}")
    return missing


def check_inputs(config, command: str) -> None:
    """`DataFileError` listing every missing data or benchmark file of the command's recipe."""
    missing = missing_inputs(config, command)
    if missing:
        listed = "\n".join(f"  {m}" for m in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataFileError(
            f"`lmm {command}`: {len(missing)} file(s) the recipe names do not exist (relative "
            f"paths are read from {Path.cwd()}):\n{listed}{more}\nFix: give the right paths "
            "(e.g. --data.init_args.train=PATH); `lmm synth` writes the synthetic data, and "
            "docs/evaluation.md says where each benchmark's files come from"
        )


def model_processor(
    config: dict,
    template: ChatTemplate,
    max_length: int,
    preprocessing: Preprocessing | None = None,
    where: str = "<recipe>",
) -> Processor | None:
    """The processor fit would connect (`ConnectData`): the recipe's model's own tokenizer, media
    spec and image token, built on the meta device (no weights read). None, with a logged note,
    when the model cannot be built (a full-size recipe whose model is not on this machine)."""
    from lmm.components.pretrained import empty_init

    try:
        with empty_init(every_rank=True):
            module = build_module(config, where)
        media = module.media_spec()
    except Exception as err:  # a missing folder, no network, a quantized model, ...
        cause: BaseException = err
        while cause.__cause__ is not None:  # jsonargparse wraps the error that says why
            cause = cause.__cause__
        text = str(cause).strip()
        log.warning(
            "%s: its model cannot be built here (%s: %s), so tokens are counted with the stub "
            "media spec (--image-tokens per image) and --tokenizer, not the model's own. Fix: "
            "point the recipe at the model's files (--model.init_args.tokenizer=DIR, ...)",
            where,
            type(cause).__name__,
            text.splitlines()[0] if text else "no message",
        )
        return None
    return Processor(
        module.tokenizer, template, media, max_length, module.image_token, preprocessing
    )
