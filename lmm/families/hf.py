"""Transformers folders straight into lmm: their class, processor settings and chat template.

`import_transformers(folder or hub id)` reads a folder of a class some family declares
(`Layout.transformers`: LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
Idefics2ForConditionalGeneration, FuyuForCausalLM, Qwen2_5_VLForConditionalGeneration), runs
that family's import into a cache folder once (keyed by the source's files) and returns the
import's `lmm.yaml`, the chat template chosen from the folder's own (`add_template`).
`lmm.load` and `LMMModule(init_from_transformers=...)` (`build_from_transformers`) build from it:
the user takes no convert step. Processor settings are read from both the transformers 4
(`preprocessor_config.json`) and 5 (`processor_config.json` holding the image processor) files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)
from transformers.utils import cached_file

from lmm.data.templates import match_chat_template
from lmm.families.model import FamilyModel
from lmm.families.registry import ExportError, Family, Layout, transformers_classes
from lmm.utils.logging import get_logger

log = get_logger(__name__)

IMPORT_FORMAT = "1"  # bump when an import writes other files: cached imports are redone
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what a model needs from a hub repo (not its .bin twins of safetensors files, not its README)
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
_DONE = ".lmm-import-done"  # written last into a cached import: it is complete


# --- a folder or hub id, its class -----------------------------------------------------------


def resolve(source: str | Path) -> Path:
    """The local folder of `source`: a folder, or a hub id's snapshot (downloaded, or from the
    hub cache when offline)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{source}: a file, not a transformers folder. Fix: give the folder that holds "
                "its config.json"
            )
        return path.resolve()
    if not _HUB_ID.fullmatch(str(source)):
        raise FileNotFoundError(
            f"{source}: no such folder, and not a hub id (owner/name). Fix: check the path"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(source), allow_patterns=_HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # an older repo with .bin weights only
            folder = Path(snapshot_download(str(source), allow_patterns=[*_HUB_FILES, "*.bin"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown, gated: all say the same to a user
        raise FileNotFoundError(
            f"{source}: not a local folder, and the hub copy cannot be had ({type(err).__name__}:"
            f" {err}). Fix: download it while online (`huggingface-cli download {source}`), or "
            "pass its local folder"
        ) from err
    return folder


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{folder}: no config.json; expected a transformers model folder (save_pretrained's)"
            " or a folder written by `lmm convert import` (lmm.yaml)"
        )
    return json.loads(file.read_text())


def transformers_class(folder: Path) -> tuple[str, Family, Layout]:
    """The transformers class of a folder (config.json `architectures`, else its `model_type`),
    with the family and layout that read it; one error naming it and the supported ones."""
    config = read_config(folder)
    known = transformers_classes()
    model_type = str(config.get("model_type", ""))
    names = list(config.get("architectures") or [])
    names += [
        m[model_type]
        for m in (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        if model_type in m
    ]
    for name in names:
        if name in known:
            return name, *known[name]
    found = names[0] if names else "model"
    raise ValueError(
        f"{folder}: a transformers {found} (model_type {model_type!r}); lmm reads folders of "
        f"{', '.join(known)}. Fix: give a folder of one of them, or import another published "
        "layout with `lmm convert import --layout ...` (`lmm convert --help` lists them)"
    )


# --- processor settings and chat template -----------------------------------------------------


def _file(source: str | Path, name: str) -> Path | None:
    """`name` in a folder or hub id, or None (none there, or `source` is a file: a .pth)."""
    if Path(source).is_file():
        return None
    try:
        file = cached_file(
            str(source),
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):  # not a folder, and no valid hub id either
        return None
    return Path(file) if file else None


def _json(source: str | Path, name: str) -> dict:
    file = _file(source, name)
    return json.loads(file.read_text()) if file else {}


def processor_configs(source: str | Path) -> tuple[dict, dict]:
    """(image processor settings, processor settings) of a folder or hub id: transformers 4's
    `preprocessor_config.json` + `processor_config.json`, or transformers 5's
    `processor_config.json` with the image processor inside; {} where there are none."""
    processor = _json(source, "processor_config.json")
    image = _json(source, "preprocessor_config.json") or processor.get("image_processor") or {}
    processor = {k: v for k, v in processor.items() if not k.endswith("_processor")}
    return dict(image), processor


def chat_template(source: str | Path) -> str | None:
    """The chat template (Jinja) of a folder or hub id: the processor's (`chat_template.jinja`,
    `chat_template.json`, `processor_config.json`), else the tokenizer's."""
    file = _file(source, "chat_template.jinja")
    if file:
        return file.read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _json(source, name).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return str(template)
    return None


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer writes its bos when it encodes text."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and bool(ids) and ids[0] == bos


def add_template(recipe: str | Path, source: str | Path, layout: Layout) -> str | dict | None:
    """Give an import's `lmm.yaml` the data template of its source: the lmm template whose
    prompt equals the source's chat template (`match_chat_template`), else the importer's own,
    else the layout's default. Returns it (None: none known, `lmm.load` then asks for one)."""
    recipe = Path(recipe)
    text = recipe.read_text()
    config = yaml.safe_load(text)
    data = config.setdefault("data", {"class_path": "lmm.data.datamodule.ChatDataModule"})
    args = data.setdefault("init_args", {})
    jinja = chat_template(source)
    chosen, why = None, ""
    if jinja:
        tok = AutoTokenizer.from_pretrained(config["model"]["init_args"]["tokenizer"])
        chosen = match_chat_template(jinja, tok.bos_token, adds_bos(tok), tok.eos_token)
        why = "its prompt equals the source's chat template"
    if chosen is None and args.get("template") is not None:
        chosen, why = args["template"], "the importer's"
    if chosen is None and layout.default_template is not None:
        chosen = layout.default_template
        why = f"the {layout.name} layout's default" + (
            "; the source's chat template is not one lmm knows" if jinja else ""
        )
    if chosen is None:
        return None
    args["template"] = chosen
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    note = f"# data.init_args.template: {why}.\n"
    recipe.write_text(header + note + yaml.safe_dump(config, sort_keys=False))
    log.info("%s: chat template %s (%s)", source, chosen, why)
    return chosen


# --- the cached import ---------------------------------------------------------------------------


def cache_root() -> Path:
    """Where imports of transformers folders are kept: `$LMM_CACHE/transformers`
    (default `~/.cache/lmm/transformers`)."""
    base = os.environ.get("LMM_CACHE") or Path.home() / ".cache" / "lmm"
    return Path(base) / "transformers"


def _fingerprint(folder: Path) -> str:
    """Hash of a folder's files (name, size, mtime) and the import format."""
    digest = hashlib.sha256(f"{IMPORT_FORMAT}\n{folder}\n".encode())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def import_transformers(source: str | Path) -> Path:
    """The `lmm.yaml` of a transformers folder or hub id, imported into the cache once.

    The family that declares the folder's class imports it (`lmm convert import --layout ...`
    does the same) into `cache_root()/<name>-<hash>`; the hash covers the source's files, so a
    changed source is imported again. Concurrent processes (ranks) wait for one import.
    """
    from filelock import FileLock

    folder = resolve(source)
    name, family, layout = transformers_class(folder)
    slug = re.sub(r"[^\w.-]+", "--", str(source).strip("/"))[-60:].strip("-.") or "model"
    out = cache_root() / f"{slug}-{_fingerprint(folder)}"
    recipe = out / "lmm.yaml"
    if (out / _DONE).is_file():
        log.info("%s (%s): the import in %s", source, name, out)
        return recipe
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / _DONE).is_file():
            shutil.rmtree(out, ignore_errors=True)  # an import that did not finish
            log.info("%s: a transformers %s; importing it once into %s", source, name, out)
            family.import_checkpoint(layout.name, folder, out)
            add_template(recipe, folder, layout)
            (out / _DONE).write_text(json.dumps({"source": str(source), "class": name}) + "\n")
    return recipe


def build_from_transformers(source: str | Path):
    """(family model, tokenizer folder, weights for `init_from` or None) of a transformers
    folder or hub id: the `model:` of its cached import (`import_transformers`)."""
    recipe = import_transformers(source)
    args = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(FamilyModel, "model", required=True)
    model = parser.instantiate_classes(parser.parse_object({"model": args["model"]})).model
    return model, str(args["tokenizer"]), args.get("init_from")


# --- exports --------------------------------------------------------------------------------------


def export_vocab(
    tokenizer: PreTrainedTokenizerBase, llm, tokens: dict[str, str]
) -> tuple[PreTrainedTokenizerBase, dict[str, Tensor], int]:
    """The tokenizer and LLM embeddings of an export whose processor needs `tokens` (each
    mapped to an existing token): (tokenizer copy, {"embed", "head"} weights, vocabulary size).

    A missing token is added to a copy of the tokenizer. Where its id falls past the LLM's
    rows, the rows grow by copies of the mapped token's: its logit then always ties with that
    token's and greedy decoding (the lower id wins a tie) never picks it, so every logit over
    lmm's vocabulary and every greedy answer stay the same. `llm` is left as it is.
    """
    tok = copy.deepcopy(tokenizer)
    embed = llm.get_input_embeddings().weight.detach()
    head = llm.get_output_embeddings().weight.detach()
    tied = head is embed
    new = [t for t in tokens if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
        rows = embed.shape[0]
        grow = max(0, len(tok) - rows)
        embed = torch.cat([embed, embed.new_zeros(grow, embed.shape[1])])
        head = embed if tied else torch.cat([head, head.new_zeros(grow, head.shape[1])])
        for token in new:
            i, j = tok.convert_tokens_to_ids(token), tok.convert_tokens_to_ids(tokens[token])
            embed[i] = embed[j]  # its input row: the features replace it, or it reads as `j`
            if i >= rows and not tied:
                head[i] = head[j]
        log.info("export: added %s to the tokenizer (transformers' processor needs them)", new)
    return tok, {"embed": embed, "head": head}, embed.shape[0]


def load_parts(target: nn.Module, parts: dict[str, nn.Module | dict[str, Tensor]]) -> None:
    """Put the weights of lmm's parts into a transformers model built on the meta device
    (`target`'s sub-module name → the module or state dict it takes), strictly: a part that
    does not fit raises ExportError naming it."""
    for name, part in parts.items():
        state = part if isinstance(part, dict) else part.state_dict()
        try:
            target.get_submodule(name).load_state_dict(
                {k: v.detach() for k, v in state.items()}, strict=True, assign=True
            )
        except RuntimeError as err:
            first = str(err).strip().splitlines()[1:2] or [str(err)]
            raise ExportError(
                f"{name} of {type(target).__name__} does not take lmm's weights ({first[0].strip()})"
            ) from None
    meta = [n for n, p in target.named_parameters() if p.is_meta]
    if meta:
        raise ExportError(f"{type(target).__name__}: parameters left unset: {meta[:4]}")
