"""The language model role: any transformers `AutoModelForCausalLM`, loaded from a path or hub id."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from lmm.components.attention import resolve_attention
from lmm.components.compiled import compile_layers
from lmm.components.pretrained import (
    MetaInitError,
    from_pretrained,
    reads_weights,
    tie_as_loaded,
)
from lmm.utils.logging import get_logger

log = get_logger(__name__)

# Causal LMs whose logits are `lm_head(decoder(...))` (then soft-capped where the config says
# so): `CausalLM.run(logits_at=...)` computes them at the chosen positions only. Others (e.g.
# Cohere's logit scale, Granite's divisor) compute every position and select after.
PLAIN_HEADS = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "phi",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "persimmon",
        "stablelm",
        "olmo",
        "olmo2",
        "starcoder2",
    }
)


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


class CausalLM(nn.Module):
    """A transformers causal LM (`self.model`) with the few members the families use."""

    def __init__(
        self,
        path: str,
        attn_implementation: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        quantization: dict | None = None,
        compile: bool = False,
    ):
        """
        Args:
            path: local folder or hub id of a transformers causal LM (`from_pretrained`).
            attn_implementation: `auto`, `flash_attention_2`, `sdpa_packed` (sdpa, packed rows
                attended per sample: lmm.components.attention), `sdpa` or `eager`.
            dtype: parameter dtype: `float32`, `bfloat16` or `float16`.
            trust_remote_code: allow code from the checkpoint (off by default).
            quantization: load the linear layers quantized by bitsandbytes (QLoRA), given as
                `BitsAndBytesConfig` arguments, e.g. `{load_in_4bit: true, bnb_4bit_quant_type:
                nf4, bnb_4bit_use_double_quant: true}`; `lmm.training.lora.quantization_kwargs`
                builds them from a LoRA config. None: full precision.
            compile: compile each decoder layer with torch.compile (inductor; attention stays
                eager; `lmm.components.compiled`): fused norms, rotary and activations, faster
                steps after a one-time compilation (cached across runs). Off by default: the
                first step then takes tens of seconds; on the CPU it needs a C++ compiler (a
                warning and eager layers without one).
        """
        super().__init__()
        attn = resolve_attention(attn_implementation, causal_lm=True)
        kwargs = dict(dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
        if quantization is not None:
            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
        try:
            self.model: PreTrainedModel = from_pretrained(
                AutoModelForCausalLM, path, attn_implementation=attn, **kwargs
            )
        except ValueError as err:  # e.g. Gemma2 has no sdpa
            if attn == "eager" or isinstance(err, MetaInitError):
                raise
            log.warning("%s does not support %s (%s); using eager attention", path, attn, err)
            self.model = from_pretrained(
                AutoModelForCausalLM, path, attn_implementation="eager", **kwargs
            )
        if compile:
            compile_layers(self.model, "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def selects_logits(self) -> bool:
        """Whether `run(logits_at=...)` projects only the chosen positions (`PLAIN_HEADS`);
        otherwise it computes every position's logits and selects."""
        return self.model.config.model_type in PLAIN_HEADS

    def get_output_embeddings(self) -> nn.Module:
        """The vocabulary projection (`lm_head`)."""
        return self.model.get_output_embeddings()

    def embed(self, input_ids: Tensor) -> Tensor:  # [B, L] -> [B, L, D]
        return self.model.get_input_embeddings()(input_ids)

    def resize_vocab(self, size: int) -> None:
        """Grow the embeddings to `size` tokens (after adding `<image>` or a pad token)."""
        if size > self.model.get_input_embeddings().num_embeddings:
            # new rows start at the old rows' mean (transformers); on the meta device there is
            # nothing to average: rank 0's rows arrive after sharding
            self.model.resize_token_embeddings(size, mean_resizing=reads_weights())
            tie_as_loaded(self.model)

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def run(
        self,
        inputs_embeds: Tensor,  # [B, L, D]
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        return_hidden: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """A training / scoring pass: logits `[B, L, V]`, or with `return_hidden` the last
        hidden states `[B, L, D]` (for score heads; the vocabulary projection then runs at
        one position only).

        `logits_at` (bool `[B, L]`): logits only at these positions, `[N, V]` in row-major
        order. Training needs them only where a next token is trained; the vocabulary
        projection (and the loss's softmax) then skips prompt, image and pad positions, which
        for a real vocabulary (32k-256k) is much of a small model's step.
        """
        kwargs = dict(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        if logits_at is not None:
            if not self.selects_logits:  # the model's own logit processing
                return self.model(**kwargs).logits[logits_at]
            hidden = self.model.get_decoder()(**kwargs).last_hidden_state
            return self.logits(hidden[logits_at])
        extra = {"output_hidden_states": True, "logits_to_keep": 1} if return_hidden else {}
        out = self.model(**kwargs, **extra)
        return out.hidden_states[-1] if return_hidden else out.logits

    def logits(self, hidden: Tensor) -> Tensor:
        """The vocabulary logits `[..., V]` of last hidden states `[..., D]`, as the causal LM
        computes them (its `lm_head`, then Gemma-2/3's final soft-capping)."""
        logits = self.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
