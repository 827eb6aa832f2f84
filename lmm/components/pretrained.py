"""Loading transformers weights, or building without them on the meta device (FSDP2 meta_init).

Inside `empty_init` on a rank other than 0, `from_pretrained` builds the model from its
config with every parameter on the meta device and reads no weight, and `reads_weights()` is
False so that components skip their own checkpoint reads; after sharding, these ranks receive
rank 0's weights (`lmm.training.strategies.broadcast_weights`). Buffers are real: the
non-persistent ones (rotary frequencies, position ids) are computed as usual.

A sizes-only build (`empty_init(published=True)`, `lmm plan`) needs only a config: when a hub
id's files are neither a folder nor in the hub cache (offline), `load_config` falls back to the published architecture lmm ships for it
(`lmm.published`), so a seed recipe builds at full size with nothing downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

import lmm.published as published
from lmm.utils.logging import get_logger

log = get_logger(__name__)

_state = {"meta": False, "published": False}  # inside empty_init, off rank 0


class MetaInitError(ValueError):
    """A model that cannot be built on the meta device (quantized on load)."""


def launched_rank_zero() -> bool:
    """Whether this process will be global rank 0, from the launcher's environment (before the
    process group exists): torchrun's RANK, SLURM's SLURM_PROCID, else Lightning's
    NODE_RANK / LOCAL_RANK (its subprocess launcher). A plain single process is rank 0."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name]) == 0
    return all(int(os.environ.get(name, "0")) == 0 for name in ("NODE_RANK", "LOCAL_RANK"))


@contextmanager
def empty_init(
    enabled: bool = True, every_rank: bool = False, published: bool = False
) -> Iterator[None]:
    """Build modules with their parameters on the meta device, reading no weights, on every
    rank but rank 0 (`launched_rank_zero`); a no-op on rank 0 or when not `enabled`.

    `every_rank` builds on the meta device on rank 0 too: for a tool that needs a model's
    tokenizer and media spec but none of its weights (`lmm data check --recipe`).

    `published` (sizes only, `lmm plan`): a hub id with no files here builds from the
    published architecture lmm ships (`load_config`), its tokenizer as a stub of the published
    length (`lmm.data.tokenization.load_tokenizer`), which counts rows and cannot tokenize;
    so it is never on where text is tokenized (training, `lmm data check`).
    """
    if not enabled or (launched_rank_zero() and not every_rank) or _state["meta"]:
        yield
        return
    from accelerate import init_empty_weights  # peft's dependency

    _state["meta"], _state["published"] = True, published
    try:
        with init_empty_weights(include_buffers=False):
            yield
    finally:
        _state["meta"] = _state["published"] = False


def builds_published() -> bool:
    """Inside `empty_init(published=True)`: hub ids with no files here build from lmm's facts."""
    return _state["published"]


def reads_weights() -> bool:
    """False inside `empty_init` off rank 0: build the module, skip reading its checkpoint."""
    return not _state["meta"]


def from_pretrained(cls: type, path: str, **kwargs) -> PreTrainedModel:
    """`cls.from_pretrained(path, **kwargs)`; inside `empty_init` off rank 0, the same model
    from its config (`attn_implementation`, `dtype`, `trust_remote_code` kept) on the meta
    device. `cls` is a model class or an `AutoModel*` class."""
    if reads_weights():
        return cls.from_pretrained(path, **kwargs)
    if kwargs.get("quantization_config") is not None:
        raise MetaInitError(
            f"{path}: a quantized (4-bit / 8-bit) model cannot be built on the meta device: each "
            "rank quantizes its own copy when it loads; set model.init_args.fsdp.meta_init: "
            "false for QLoRA"
        )
    keep = {k: kwargs[k] for k in ("attn_implementation", "dtype") if k in kwargs}
    remote = kwargs.get("trust_remote_code", False)
    if isinstance(cls, type) and issubclass(cls, PreTrainedModel):  # its config class reads
        config = load_config(path, cls.config_class, trust_remote_code=remote)
        return tie_as_loaded(cls._from_config(config, **keep))
    config = load_config(path, trust_remote_code=remote)
    return tie_as_loaded(cls.from_config(config, trust_remote_code=remote, **keep))


def tie_as_loaded(model: PreTrainedModel) -> PreTrainedModel:
    """Share the input embeddings with the output head when the config ties them, as
    `from_pretrained` does: inside accelerate's `init_empty_weights` transformers' own tying
    re-registers a new meta parameter, and the head would count (and shard) twice."""
    config = model.config.get_text_config()
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and inp is not None and out is not None:
        out._parameters["weight"] = inp.weight  # not register_parameter: accelerate copies it
    return model


def load_config(
    path: str, config_class: type[PretrainedConfig] = AutoConfig, trust_remote_code: bool = False
) -> PretrainedConfig:
    """`config_class.from_pretrained(path)`; in a sizes-only build (`empty_init(published=True)`),
    when `path` has no
    files here (not a folder, not in the hub cache, no network) and lmm ships its published
    architecture, that config instead (`lmm.published.config`). Reading weights, a missing
    checkpoint stays an error: the fallback gives sizes, never values."""
    try:
        return config_class.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError:
        if not builds_published() or Path(path).exists() or published.facts(path) is None:
            raise
    log.info("%s: no files here; building its published architecture (lmm/published)", path)
    return published.config(path, None if config_class is AutoConfig else config_class)
