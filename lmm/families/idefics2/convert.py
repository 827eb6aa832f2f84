"""Idefics2 checkpoints: import a transformers Idefics2 folder (Mantis-8B-Idefics2, idefics2-8b) into
lmm, export an lmm Idefics2 model back to one.

The vision tower and the connector load from transformers' own layout (`Idefics2Vision` and
`PerceiverConnector` read `model.vision_model.*` / `model.connector.*` of an Idefics2
checkpoint), so import copies them unchanged; the LLM becomes a plain causal LM folder
(`model.text_model.*` → `model.*`, `lm_head.*`) that `CausalLM` (and QLoRA's quantized loading)
can read. `export_hf` writes an `Idefics2ForConditionalGeneration` folder with its processor
files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.idefics2 import modeling_idefics2 as hf

from lmm.components.qformer import checkpoint_tensors
from lmm.data.sample import IMAGE_MARKER
from lmm.data.tokenization import checkpoint_tokenizer
from lmm.families.hf import export_vocab, load_parts, processor_configs
from lmm.families.idefics2.model import (
    FAKE_IMAGE_TOKEN,
    IDEFICS2_MEAN,
    IDEFICS2_STD,
    _idefics2_config,
)
from lmm.families.registry import ExportError, component, import_recipe
from lmm.training.checkpoint import save_safetensors
from lmm.utils.logging import get_logger

log = get_logger(__name__)

VISION_PREFIX, CONNECTOR_PREFIX = "model.vision_model.", "model.connector."
TEXT_PREFIX, HEAD_PREFIX = "model.text_model.", "lm_head."
TEMPLATE = "lmm.data.templates.Idefics2"
END_OF_UTTERANCE = "<end_of_utterance>"


def import_checkpoint(
    src: str | Path, out: str | Path, tokenizer: str | Path | None = None
) -> Path:
    """Write lmm's layout of a transformers Idefics2 checkpoint to `out`; return `out/lmm.yaml`.

    `out/vision/` holds the checkpoint's config, preprocessor config and its vision tower and
    connector tensors under their transformers names (what `Idefics2Vision` and
    `PerceiverConnector` read); `out/llm/` the Mistral (or other) causal LM; `out/tokenizer/` the
    tokenizer; `out/lmm.yaml` the `model:` part of a recipe that builds the whole model from
    them (no other weights to load). `src` is a folder or a hub id; `tokenizer` defaults to it.
    """
    where = str(src)
    out = Path(out)
    config = _idefics2_config(where)
    vision = checkpoint_tensors(where, VISION_PREFIX)
    connector = checkpoint_tensors(where, CONNECTOR_PREFIX)
    text = checkpoint_tensors(where, TEXT_PREFIX)
    try:
        head = checkpoint_tensors(where, HEAD_PREFIX)
    except KeyError:
        head = {}  # tied to the input embeddings
    _check_fits(hf.Idefics2VisionTransformer, config.vision_config, vision, f"{where} vision")
    _check_fits(hf.Idefics2Connector, config, connector, f"{where} connector")
    text_config = _text_config(config, tied=not head)
    llm_state = {"model." + k: v for k, v in text.items()}
    llm_state |= {"lm_head." + k: v for k, v in head.items()}
    _check_fits(AutoModelForCausalLM.from_config, text_config, llm_state, f"{where} LLM")

    tok = _tokenizer(tokenizer or where, config)
    pre = _preprocessor(where, config)

    vision_dir, llm_dir = out / "vision", out / "llm"
    vision_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(vision_dir)
    tensors = {VISION_PREFIX + k: v for k, v in vision.items()}
    tensors |= {CONNECTOR_PREFIX + k: v for k, v in connector.items()}
    save_safetensors(tensors, vision_dir / "model.safetensors")  # checked by checkpoint_tensors
    (vision_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    llm_dir.mkdir(parents=True, exist_ok=True)
    text_config.save_pretrained(llm_dir)
    save_torch_state_dict({k: v.contiguous() for k, v in llm_state.items()}, llm_dir)
    tok.save_pretrained(out / "tokenizer")
    recipe = out / "lmm.yaml"
    recipe.write_text(_recipe(where, out, pre, _dtype_name(vision), _dtype_name(text)))
    log.info("imported %s (transformers Idefics2) into %s", where, out)
    return recipe


def write_layout_configs(
    config: Idefics2Config, tokenizer: PreTrainedTokenizerBase, out: str | Path
) -> None:
    """The folders `import_checkpoint` writes, without weights: `out/vision/` (the checkpoint's
    config), `out/llm/` (its text config as a causal LM) and `out/tokenizer/`; for a sizes-only
    build (`lmm plan`, `lmm.published.IMPORTS`)."""
    out = Path(out)
    config.save_pretrained(out / "vision")
    _text_config(config, tied=config.text_config.tie_word_embeddings).save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "tokenizer")


def _check_fits(build, config, state: dict[str, Tensor], where: str) -> None:
    """Names and shapes of `state` equal those of the module `build(config)` (made on meta)."""
    with torch.device("meta"):
        module: nn.Module = build(config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where}: the weights do not fit the config: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, other shapes {[(k, got[k], expected[k]) for k in wrong[:3]]}; "
            "is this a transformers Idefics2 checkpoint with its own config.json?"
        )


def _text_config(config: Idefics2Config, tied: bool):
    """The LLM's own config: the checkpoint's `text_config`, as a causal LM."""
    text = copy.deepcopy(config.text_config)
    if text.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"text_config.model_type {text.model_type!r} has no transformers causal LM class"
        )
    text.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text.model_type]]
    text.tie_word_embeddings = tied
    return text


def _tokenizer(name: str | Path, config: Idefics2Config):
    """The checkpoint's tokenizer, checked against the config's image token and Idefics2's tokens."""
    tok = checkpoint_tokenizer(name)
    image_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    if image_id != config.image_token_id:
        raise ValueError(
            f"{name}: config.json has image_token_id {config.image_token_id} but the tokenizer "
            f"maps <image> to {image_id}; pass the checkpoint's own tokenizer"
        )
    vocab = tok.get_vocab()
    missing = [t for t in (FAKE_IMAGE_TOKEN, END_OF_UTTERANCE) if t not in vocab]
    if missing:
        raise ValueError(
            f"{name}: the tokenizer lacks Idefics2's tokens {missing}; their embeddings would be "
            "untrained. Pass the checkpoint's own tokenizer"
        )
    return tok


def _preprocessor(where: str, config: Idefics2Config) -> dict:
    """The checkpoint's image preprocessing (transformers' defaults where it has none), checked."""
    pre, processor = processor_configs(where)
    size = pre.get("size") or {"shortest_edge": 378, "longest_edge": 980}
    if "shortest_edge" not in size or "longest_edge" not in size or not pre.get("do_resize", True):
        raise ValueError(
            f"{where}: preprocessor size {size} (do_resize {pre.get('do_resize', True)}); lmm "
            "resizes Idefics2 images by shortest_edge / longest_edge only"
        )
    seq_len = processor.get("image_seq_len", config.perceiver_config.resampler_n_latents)
    if seq_len != config.perceiver_config.resampler_n_latents:
        raise ValueError(
            f"{where}: processor image_seq_len {seq_len} but the perceiver has "
            f"{config.perceiver_config.resampler_n_latents} latents; the checkpoint is inconsistent"
        )
    resample = pre.get("resample", 2)
    if resample != 2:
        log.warning("%s: resample %s; lmm resizes Idefics2 views bilinearly (2)", where, resample)
    return {
        **pre,
        "do_image_splitting": bool(pre.get("do_image_splitting", False)),
        "size": {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]},
        "image_mean": list(pre.get("image_mean", IDEFICS2_MEAN)),
        "image_std": list(pre.get("image_std", IDEFICS2_STD)),
    }


def _dtype_name(state: dict[str, Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")


def _recipe(src: str, out: Path, pre: dict, vision_dtype: str, llm_dtype: str) -> str:
    """The `model:` part of a recipe that builds the imported model."""
    vision = str((out / "vision").resolve())
    model = component(
        "lmm.families.idefics2.Idefics2Model",
        vision=component("lmm.families.idefics2.Idefics2Vision", path=vision, dtype=vision_dtype),
        connector=component(
            "lmm.families.idefics2.PerceiverConnector", path=vision, dtype=vision_dtype
        ),
        llm=component(
            "lmm.components.language.CausalLM", path=str((out / "llm").resolve()), dtype=llm_dtype
        ),
        do_image_splitting=pre["do_image_splitting"],
        shortest_edge=pre["size"]["shortest_edge"],
        longest_edge=pre["size"]["longest_edge"],
    )
    header = [
        f"Imported from {src} (transformers Idefics2) by lmm.families.idefics2.convert.",
        "The model part of a recipe; every weight loads from the folders it names.",
        f"Data template that matches the source: {TEMPLATE}.",
    ]
    return import_recipe(header, model, str((out / "tokenizer").resolve()))


# --- export ---------------------------------------------------------------------------------------


def export_hf(module, out: str | Path) -> Path:
    """Write `module` (an `Idefics2Model`) as a transformers `Idefics2ForConditionalGeneration`
    folder: the model, its tokenizer, `preprocessor_config.json` (the model's view sizes,
    splitting, mean and std) and `processor_config.json` (`image_seq_len`).

    transformers' `Idefics2Processor` writes `<fake_token_around_image>` and needs
    `<end_of_utterance>`; a tokenizer without the latter gets it (`export_vocab`).
    """
    from transformers.models.idefics2.image_processing_pil_idefics2 import (
        Idefics2ImageProcessorPil,  # the PIL one: no torchvision needed to write it
    )

    from lmm.training.lora import has_lora

    target = "Idefics2ForConditionalGeneration"
    model = module.model
    vision, connector, llm = model.vision, model.connector, model.llm.model
    if has_lora(module):
        raise ExportError(
            f"cannot export to {target}: LoRA adapters; merge them first "
            "(lmm.training.lora.merge_lora)"
        )
    if model.fake_image_token != FAKE_IMAGE_TOKEN:
        raise ExportError(
            f"cannot export to {target}: fake_image_token {model.fake_image_token!r}; its "
            f"processor writes {FAKE_IMAGE_TOKEN!r} around every view"
        )
    config = copy.deepcopy(connector.config)
    built = config.text_config
    text_config = copy.deepcopy(llm.config)
    for size in ("hidden_size", "intermediate_size"):  # the modality projection's widths
        if getattr(text_config, size) != getattr(built, size):
            raise ExportError(
                f"cannot export to {target}: the LLM's {size} {getattr(text_config, size)} but "
                f"the connector was built for {getattr(built, size)}; transformers sizes both "
                "from one text_config"
            )
    eos = module.tokenizer.eos_token or module.tokenizer.pad_token
    tok, rows, vocab = export_vocab(module.tokenizer, llm, {END_OF_UTTERANCE: eos})
    text_config.vocab_size = vocab
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    config.text_config = text_config
    config.vision_config = copy.deepcopy(vision.model.config)
    config.image_token_id = module.image_token_id
    config.tie_word_embeddings = tied
    config.architectures = [target]
    with torch.device("meta"):
        hf = Idefics2ForConditionalGeneration(config)
    base = getattr(llm, llm.base_model_prefix)
    embed = next(f"{n}.weight" for n, m in base.named_modules() if m is base.get_input_embeddings())
    load_parts(
        hf,
        {
            "model.vision_model": vision.model,
            "model.connector": connector.model,
            "model.text_model": {**base.state_dict(), embed: rows["embed"]},
            "lm_head": {"weight": rows["head"]},
        },
    )
    if tied:
        hf.tie_weights()
    out = Path(out)
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    Idefics2ImageProcessorPil(
        do_image_splitting=model.do_image_splitting,
        size={"shortest_edge": model.shortest_edge, "longest_edge": model.longest_edge},
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    ).save_pretrained(out)
    processor = {"processor_class": "Idefics2Processor", "image_seq_len": connector.num_latents}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    log.info("exported the Idefics2 model to %s (transformers %s)", out, target)
    return out
