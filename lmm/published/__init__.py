"""Published architectures without weights: the `config.json` sizes (and tokenizer lengths) of
the hub models the seed recipes name, shipped as small JSON files beside this module.

They let a recipe build at full size on the meta device with no files on disk and no network
(`lmm.components.pretrained.empty_init(published=True)`, `lmm plan`): when a hub id's own files are neither a
local folder nor in the hub cache, `config` and `stub_tokenizer` stand in. The real loader is
unchanged when a checkpoint is present, and nothing here is used when weights are read.

Each file holds `id` (the hub id), `source` (where the numbers were read), `config` (the
`config.json` keys that set parameter shapes; the rest keep transformers' defaults), and
`tokenizer` (`length` = `len(tokenizer)` and its special tokens): the meta build adds the
recipe's image and pad tokens to a stub tokenizer of that length exactly as it would to the
real one, so the embedding rows grow the same. `published_parameters` is the model card's
safetensors count, for `test_plan_parameter_counts`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

HERE = Path(__file__).parent


# The folders the seed recipes read that an import writes (`lmm convert import`, a family's
# convert module; the recipes' header comments name the hub checkpoint each comes from), and
# the family whose `convert.write_layout_configs` writes that layout (None: a plain
# `save_pretrained` folder of config and tokenizer). A sizes-only build stands them in from
# the hub model's facts when the folder is not here (`lmm.plan.meta_module`).
IMPORTS = {
    "checkpoints/fuyu-8b": ("adept/fuyu-8b", "fuyu"),  # recipes/mantis/fuyu.yaml
    "checkpoints/idefics2-8b": ("HuggingFaceM4/idefics2-8b", "idefics2"),  # mantis/idefics2_qlora
    "checkpoints/mantis-8b-idefics2": ("TIGER-Lab/Mantis-8B-Idefics2", "idefics2"),  # videoscore
    # Vicuna-7B v0 = LLaMA-7B + lmsys/vicuna-7b-delta-v0 (MiniGPT-4's recipe; cheetah/vicuna)
    "checkpoints/vicuna-7b-v0": ("lmsys/vicuna-7b-delta-v0", None),
}


def _file(hub_id: str) -> Path:
    return HERE / (hub_id.replace("/", "__") + ".json")


@cache
def facts(hub_id: str) -> dict | None:
    """The shipped facts of a hub id (`owner/name`), or None when lmm ships none."""
    file = _file(str(hub_id))
    if "/" not in str(hub_id) or not file.is_file():
        return None
    return json.loads(file.read_text())


def shipped() -> list[str]:
    """The hub ids lmm ships facts for."""
    return sorted(json.loads(f.read_text())["id"] for f in HERE.glob("*.json"))


def config(hub_id: str, config_class: type[PretrainedConfig] | None = None) -> PretrainedConfig:
    """The shipped `config.json` of `hub_id` as a transformers config; with `config_class` (a
    model class's own, e.g. `SiglipVisionConfig` of a SigLIP checkpoint) the sub-config of
    that class, as `config_class.from_pretrained(hub_id)` returns it."""
    found = facts(hub_id)
    if found is None:
        raise KeyError(f"{hub_id}: lmm ships no published architecture for it ({shipped()})")
    values = dict(found["config"])
    full = AutoConfig.for_model(values.pop("model_type"), **values)
    if config_class is None or isinstance(full, config_class):
        return full
    for key in list(full.sub_configs) if hasattr(full, "sub_configs") else []:
        sub = getattr(full, key, None)
        if isinstance(sub, config_class):
            return sub
    raise TypeError(
        f"{hub_id}: its published config is {type(full).__name__}, with no "
        f"{config_class.__name__} inside"
    )


def stub_tokenizer(hub_id: str) -> PreTrainedTokenizerFast:
    """A tokenizer of the published length and special tokens of `hub_id`, for a meta build
    only: its vocabulary is filler (`<|stub_N|>`), so it counts rows, it does not tokenize."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    found = facts(hub_id)
    if found is None or "tokenizer" not in found:
        raise KeyError(f"{hub_id}: lmm ships no published tokenizer length for it")
    tok = found["tokenizer"]
    special = {k: v for k, v in tok.items() if k.endswith("_token") and v is not None}
    named = list(dict.fromkeys([*special.values(), *tok.get("named", [])]))
    vocab = {name: i for i, name in enumerate(named)}
    vocab.update({f"<|stub_{i}|>": i for i in range(len(named), tok["length"])})
    backend = Tokenizer(WordLevel(vocab, unk_token=special.get("unk_token", named[0])))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)
