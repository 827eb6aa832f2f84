"""FamilyModel: everything the shared core needs from a family's architecture (docs/families.md)."""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lmm.components.attention import PACKED_SDPA
from lmm.components.flops import attention_flops, llm_step_flops, matmul_flops, trains
from lmm.components.language import CausalLM
from lmm.data.batch import Batch
from lmm.data.packing import block_causal_mask
from lmm.data.processor import MediaSpec
from lmm.data.sample import IMAGE_MARKER
from lmm.generation.decode import Prefill
from lmm.training.strategies import FSDP2Config, apply_fsdp2


@functools.cache
def forward_arguments(cls: type[nn.Module]) -> frozenset[str]:
    """The argument names of a module class's `forward` (looked up once per class)."""
    return frozenset(inspect.signature(cls.forward).parameters)


class FamilyModel(nn.Module):
    """The math of a family: media into token embeddings, through its `CausalLM` (`llm`).

    A family names its `parts()` and says how media become pixels and feature slots
    (`media_spec()`, plain values) and where their features go (`embed`). The rest has defaults
    a family overrides where it differs: position ids (M-RoPE), the prefill the generator
    decodes from (VPG-C's context), the FSDP2 plan, the FLOPs of a training step, the parts
    frozen by default and the special tokens its tokenizer needs. `forward` is what the
    Lightning steps call (the FSDP2 root).
    """

    llm: CausalLM
    default_image_token: str = IMAGE_MARKER  # the placeholder features replace

    # --- what every family provides -------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        """Named sub-modules (`vision`, `connector`, `llm`, ...): freezing, per-part lr, LoRA."""
        raise NotImplementedError

    def media_spec(self) -> MediaSpec:
        """How media become pixel views and feature slots (plain values: no modules)."""
        raise NotImplementedError

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D]
        """Token embeddings with every media item's features at its placeholders."""
        raise NotImplementedError

    # --- defaults -------------------------------------------------------------------------
    def default_frozen(self) -> list[str]:
        """Parts not trained unless the recipe's `freeze` says otherwise."""
        return []

    def special_tokens(self) -> list[str]:
        """Tokens the tokenizer must hold as single special tokens (beside the image token)."""
        return []

    def attention_mask(self, batch: Batch, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The mask the LLM gets: the 2-D padding mask, or for packed rows a block-diagonal one.

        flash-attn 2 and `sdpa_packed` get no mask for packed rows: they attend within each
        sample, which they find from the restarting position ids.
        """
        if not batch.packed:
            return batch.attention_mask
        impl = self.llm.model.config._attn_implementation
        if impl in ("flash_attention_2", PACKED_SDPA):
            return None
        mask = block_causal_mask(batch.seq_lens, batch.input_ids.shape[1], batch.input_ids.device)
        if impl == "sdpa":
            return mask
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill(~mask, torch.finfo(dtype).min)  # eager adds the mask

    def position_ids(self, batch: Batch, image_token_id: int) -> Tensor:
        """The LLM's position ids: the batch's own (restarting per packed sample)."""
        return batch.position_ids

    def prepare(self, batch: Batch, image_token_id: int) -> tuple[Tensor, AbstractContextManager]:
        """The embeddings `[B, L, D]` and a context the LLM runs in (VPG-C's; default: none)."""
        return self.embed(batch, image_token_id), nullcontext()

    def forward(
        self,
        batch: Batch,
        image_token_id: int,
        attention_mask: Tensor | None,
        return_hidden: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Logits `[B, L, V]`: embeddings with the media in, through the LLM.

        With `return_hidden`, the LLM's last hidden states `[B, L, D]` instead (score heads);
        with `logits_at` (bool `[B, L]`), the logits at those positions only, `[N, V]`
        (training: where a next token is trained).
        """
        embeds, context = self.prepare(batch, image_token_id)
        positions = self.position_ids(batch, image_token_id)
        with context:
            return self.llm.run(
                embeds, attention_mask, positions, return_hidden, logits_at=logits_at
            )

    def prefill(self, batch: Batch, image_token_id: int) -> Prefill:
        """What the generator decodes a left-padded prompt batch from."""
        return Prefill(self.embed(batch, image_token_id), batch.attention_mask)

    def shard(self, mesh: DeviceMesh, config: FSDP2Config) -> None:
        """The FSDP2 plan: vision layers and tower, decoder layers, then this model as the root."""
        apply_fsdp2(self, self.parts().get("vision"), self.llm.model, mesh, config)

    def vision_tokens(self) -> tuple[int, int]:
        """(tokens the vision tower runs on, tokens it hands on) per pixel view, for FLOPs."""
        vision = getattr(self, "vision", None)
        if vision is None or not hasattr(vision, "num_tokens"):
            return (0, 0)
        size = (vision.image_size, vision.image_size)
        seq = getattr(vision, "sequence_length", None)
        return (seq(size) if seq else vision.num_tokens(size), vision.num_tokens(size))

    def step_flops(self, batch: Batch, head_tokens: int | None) -> float:
        """Training FLOPs of `batch` (forward + backward): vision tower, connector, LLM.

        `head_tokens`: the positions the LLM's vocabulary projection runs at (None: all).
        """
        parts = self.parts()
        views = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        encoded, handed = self.vision_tokens()
        flops, upstream = 0.0, False
        for name, tokens in (("vision", views * encoded), ("connector", views * handed)):
            if name in parts:
                upstream = upstream or trains(parts[name])
                flops += matmul_flops(parts[name], tokens, upstream)
        vision = parts.get("vision")
        config = getattr(getattr(vision, "model", None), "config", None)
        if config is not None:
            grad = trains(vision)
            layers, width = config.num_hidden_layers, config.hidden_size
            flops += layers * attention_flops(views, encoded, encoded, width, grad, grad)
        grad_from = 0 if upstream or trains(self.llm) else None
        return flops + llm_step_flops(self.llm, batch, grad_from, head_tokens)


def with_unused(embeds: Tensor, *unused: Tensor) -> Tensor:
    """`embeds` + 0 × the outputs of media modules no token of this batch uses.

    A rank whose batch has no media still runs its media modules on a blank input: sharded
    (FSDP) and DDP ranks must all take part in the same collectives, and every trained parameter
    gets a (zero) gradient. Families call it when `joins_collectives(model)`.
    """
    total = sum(u.sum() for u in unused)
    return embeds + 0.0 * total


def joins_collectives(model: nn.Module) -> bool:
    """Whether a batch without media must still run the media modules (distributed training)."""
    return model.training and torch.distributed.is_initialized()
