"""BLIP-2 blocks: the EVA ViT of BLIP-2 as a vision tower, and the Q-Former with its query tokens.

Both load from a transformers BLIP-2 checkpoint: a whole `Blip2ForConditionalGeneration` /
`Blip2Model` (e.g. `Salesforce/blip2-flan-t5-xxl`, whose Q-Former is the one Cheetah starts
from), of which only the `vision_model.*` or `qformer.*` + `query_tokens` tensors are read, or a
folder holding the sub-model alone.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn
from transformers import Blip2QFormerModel, Blip2VisionModel, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.utils import cached_file

from lmm.components.attention import resolve_attention
from lmm.components.language import _dtype
from lmm.components.pretrained import from_pretrained, load_config, reads_weights
from lmm.components.vision import VisionEncoder, normalization
from lmm.training.checkpoint import load_safetensors
from lmm.utils.logging import get_logger

log = get_logger(__name__)

BLIP2 = "blip-2"  # model_type of a whole BLIP-2 checkpoint


def checkpoint_tensors(path: str, prefix: str) -> dict[str, Tensor]:
    """Every tensor of a safetensors checkpoint whose name starts with `prefix`, prefix removed.

    Reads one `model.safetensors` or, for a sharded checkpoint, only the shards that hold such
    tensors. `path` is a folder or a hub id.
    """
    index = cached_file(path, "model.safetensors.index.json", **_optional())
    if index is not None:
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted({file for name, file in weight_map.items() if name.startswith(prefix)})
        paths = [cached_file(path, file) for file in files]
    else:
        single = cached_file(path, "model.safetensors", **_optional())
        if single is None:
            raise FileNotFoundError(
                f"{path}: no model.safetensors(.index.json); BLIP-2 parts load from safetensors "
                "checkpoints only (convert a .bin checkpoint with save_pretrained first)"
            )
        paths = [single]
    tensors = {}
    for file in paths:  # each tensor read checked against its hash when lmm wrote the file
        for name, tensor in load_safetensors(file, lambda n: n.startswith(prefix)).items():
            tensors[name[len(prefix) :]] = tensor
    if not tensors:
        raise KeyError(f"{path}: no tensor named '{prefix}*' in the checkpoint")
    return tensors


def _optional() -> dict:
    return {"_raise_exceptions_for_missing_entries": False}


def _load_part(
    path: str,
    model_cls: type[PreTrainedModel],
    sub_config: str,
    prefix: str,
    attn_implementation: str,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """A BLIP-2 sub-model: from a whole BLIP-2 checkpoint (by key prefix) or from its own folder."""
    config = load_config(path)
    if config.model_type != BLIP2:
        return from_pretrained(
            model_cls, path, attn_implementation=attn_implementation, dtype=dtype
        )
    with no_init_weights():  # every parameter comes from the checkpoint
        model = model_cls._from_config(
            getattr(config, sub_config), attn_implementation=attn_implementation, dtype=dtype
        )
    if not reads_weights():  # built on the meta device: rank 0's weights come later
        return model
    state = checkpoint_tensors(path, prefix)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"{path}: the '{prefix}*' tensors do not fit {model_cls.__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(dtype)


def _attention(attn_implementation: str) -> str:
    attn = resolve_attention(attn_implementation)
    return "sdpa" if attn == "flash_attention_2" else attn  # BLIP-2 parts have no flash-attn 2


class Blip2VisionTower(VisionEncoder):
    """BLIP-2's vision encoder (EVA ViT-g/14 with `ln_vision` as its final layer norm).

    Features are the last hidden state after that layer norm, every token kept (CLS + patches),
    as BLIP-2 and Cheetah give them to the Q-Former.
    """

    def __init__(
        self,
        path: str,
        attn_implementation: str = "auto",
        dtype: str = "float32",
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ):
        """
        Args:
            path: folder or hub id of a BLIP-2 checkpoint (its `vision_model.*` is read) or of
                a `Blip2VisionModel`.
            attn_implementation: `auto`, `sdpa` or `eager`.
            dtype: parameter dtype.
            image_mean: normalization mean (default: the checkpoint's preprocessor config, else CLIP's).
            image_std: normalization std (default: the checkpoint's preprocessor config, else CLIP's).
        """
        super().__init__()
        self.model = _load_part(
            path,
            Blip2VisionModel,
            "vision_config",
            "vision_model.",
            _attention(attn_implementation),
            _dtype(dtype),
        )
        config = self.model.config
        self.out_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        mean, std = normalization(path, "clip")
        self.image_mean = tuple(image_mean) if image_mean is not None else mean
        self.image_std = tuple(image_std) if image_std is not None else std

    def num_tokens(self, image_size: tuple[int, int]) -> int:
        h, w = image_size
        return (h // self.patch_size) * (w // self.patch_size) + 1

    def forward(self, pixel_values: Tensor) -> Tensor:  # [N, 3, H, W] -> [N, 1 + P, D_v]
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values.to(dtype)).last_hidden_state


class QFormer(nn.Module):
    """BLIP-2's Q-Former (`Blip2QFormerModel`) and its learned query tokens.

    `forward(features)` runs the checkpoint's queries over the vision features; VPG-C passes its
    own `queries`. The query count is the number of LLM tokens an image becomes.
    """

    def __init__(
        self,
        path: str,
        attn_implementation: str = "auto",
        dtype: str = "float32",
        num_queries: int = 32,
        init_std: float = 0.02,
    ):
        """
        Args:
            path: folder or hub id of a BLIP-2 checkpoint (its `qformer.*` and `query_tokens`
                are read) or of a `Blip2QFormerModel` (queries then start random).
            attn_implementation: `auto`, `sdpa` or `eager`.
            dtype: parameter dtype (BLIP-2 keeps the Q-Former in float32).
            num_queries: number of queries when the checkpoint has none (a bare Q-Former).
            init_std: std of random queries, used when the checkpoint has none or they are all
                zero (a zero start explodes: LayerNorm of zeros).
        """
        super().__init__()
        torch_dtype = _dtype(dtype)
        self.model = _load_part(
            path,
            Blip2QFormerModel,
            "qformer_config",
            "qformer.",
            _attention(attn_implementation),
            torch_dtype,
        )
        config = load_config(path)
        if not reads_weights():  # on the meta device: rank 0's values come later
            queries = torch.empty(
                1, num_queries, self.model.config.hidden_size, dtype=torch_dtype, device="meta"
            )
        elif config.model_type == BLIP2:
            queries = checkpoint_tensors(path, "query_tokens")[""].to(torch_dtype)
        else:
            queries = torch.zeros(1, num_queries, self.model.config.hidden_size, dtype=torch_dtype)
        if not queries.is_meta and not queries.any():
            log.warning("%s: query tokens are all zero; starting them at N(0, %g)", path, init_std)
            queries.normal_(0.0, init_std)
        self.query_tokens = nn.Parameter(queries)  # [1, Q, D_q]

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def encoder_hidden_size(self) -> int:
        return self.model.config.encoder_hidden_size

    def forward(
        self,
        features: Tensor,  # [N, S, D_v] vision features
        queries: Tensor | None = None,  # [1 or N, Q, D_q]; default: the learned query tokens
    ) -> Tensor:  # [N, Q, D_q]
        """The query outputs of the Q-Former cross-attending to each image's features."""
        queries = self.query_tokens if queries is None else queries
        queries = queries.expand(features.shape[0], -1, -1)
        dtype = self.query_tokens.dtype
        out = self.model(query_embeds=queries.to(dtype), encoder_hidden_states=features.to(dtype))
        return out.last_hidden_state
