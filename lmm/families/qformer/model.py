"""QFormerModel: the math of the Q-Former family (BLIP-2 → LLM), with Cheetah's VPG-C.

An image is encoded by the vision tower, summarised by the Q-Former into its query outputs
(32 in BLIP-2), projected to the LLM width and scattered into the `<image>` placeholders.

VPG-C (Cheetah's Visual Prompt Generator Complete) runs inside the LLM, at the input of decoder
layer `update_layer`, and only when the whole prompt is processed at once (training, scoring,
the prefill of generation; the KV cache carries its effect to the decoded tokens). For every
image it takes the hidden state `h` of its sample's last instruction token, runs the frozen
Q-Former again with the queries `vpgc.query_tokens + qformer_proj(h)` over that image's vision
features, and adds `llm_proj(...)` onto the image's token positions. Both projections start at
zero, so a new VPG-C leaves the model's output unchanged.

How the batch reaches the decoder layer: `vpgc_inputs` builds a `VPGCContext` (image positions,
instruction positions, vision features) next to the embeddings; `forward` makes it active for
its one LLM call, and a forward pre-hook on the decoder layer applies it. Generation gets the
context with the prefill (`Prefill.context`): the generator enters it, for the rows it runs,
around every pass over whole prompts.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmm.components.connectors import Connector, LinearConnector
from lmm.components.flops import (
    attention_flops,
    layer_list,
    llm_step_flops,
    matmul_flops,
    trains,
    weight_flops,
)
from lmm.components.language import CausalLM
from lmm.components.merge import scatter_media
from lmm.components.qformer import QFormer
from lmm.components.vision import VisionEncoder
from lmm.data.batch import Batch
from lmm.data.media import ImageTransform
from lmm.data.processor import MediaSpec
from lmm.families.model import FamilyModel, joins_collectives, with_unused
from lmm.generation.decode import Prefill
from lmm.utils.logging import get_logger

log = get_logger(__name__)


# What Cheetah trains: VPG-C only. Without VPG-C, BLIP-2's stage 2: Q-Former and projection.
FROZEN_WITH_VPGC = ["vision", "qformer", "connector", "llm"]
FROZEN_WITHOUT_VPGC = ["vision", "llm"]
# The Q-Former's matmuls that read the vision features (the others read its queries).
_MEMORY_SIDE = ("crossattention.attention.key", "crossattention.attention.value")


@dataclass(frozen=True)
class QFormerMediaSpec(MediaSpec):
    """Tokens per image (the Q-Former's query count, whatever the size) and the image transform."""

    transform: ImageTransform
    num_queries: int

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        return self.num_queries


@dataclass
class VPGCContext:
    """What VPG-C needs about a batch at the decoder layer: where each image is, and its features."""

    rows: Tensor  # [N] batch row of each image
    positions: Tensor  # [N, Q] sequence positions of each image's tokens
    instruction: Tensor  # [N] position of the last instruction token of the image's sample
    vision: Tensor  # [N, S, D_v] the image's vision features (the Q-Former's memory)
    extent: tuple[int, int]  # (rows, length) the hidden states must have at least


class VPGC(nn.Module):
    """Cheetah's VPG-C parameters: new query tokens and two zero-initialised projections."""

    def __init__(
        self, llm_dim: int, qformer_dim: int, query_tokens: Tensor, init_std: float = 0.02
    ):
        """
        Args:
            llm_dim: hidden width of the LLM.
            qformer_dim: hidden width of the Q-Former.
            query_tokens: `[1, Q, qformer_dim]` starting queries (the Q-Former's own, copied).
            init_std: std of random queries if `query_tokens` are all zero (zeros explode).
        """
        super().__init__()
        queries = query_tokens.detach().clone().float()
        if not queries.is_meta and not queries.any():  # (meta: sizes only, no values)
            queries.normal_(0.0, init_std)
        self.query_tokens = nn.Parameter(queries)  # [1, Q, D_q]
        self.qformer_proj = nn.Linear(llm_dim, qformer_dim)  # instruction → query offset
        self.llm_proj = nn.Linear(qformer_dim, llm_dim)  # re-extracted features → residual
        for p in (*self.qformer_proj.parameters(), *self.llm_proj.parameters()):
            nn.init.zeros_(p)

    def forward(
        self,
        instruction: Tensor,  # [N, D_llm] hidden state of each image's instruction token
        vision: Tensor,  # [N, S, D_v] each image's vision features
        qformer: QFormer,
    ) -> Tensor:  # [N, Q, D_llm] residual for each image's tokens
        """The residual VPG-C adds onto each image's tokens."""
        offset = self.qformer_proj(instruction.to(self.qformer_proj.weight.dtype))  # [N, D_q]
        queries = self.query_tokens + offset[:, None]  # [N, Q, D_q]
        out = qformer(vision, queries)  # [N, Q, D_q]
        return self.llm_proj(out.to(self.llm_proj.weight.dtype))


class QFormerModel(FamilyModel):
    """Vision tower → Q-Former → projection → causal LM, with optional VPG-C inside the LLM."""

    def __init__(
        self,
        vision: VisionEncoder,
        qformer: QFormer,
        llm: CausalLM,
        connector: Callable[[int, int], Connector] = LinearConnector,
        vpgc: bool = True,
        update_layer: int | None = None,
        image_aspect: Literal["pad", "resize", "crop"] = "resize",
    ):
        """
        Args:
            vision: the vision tower (BLIP-2's EVA ViT: `lmm.components.qformer.Blip2VisionTower`).
            qformer: the Q-Former with its query tokens.
            llm: the causal language model.
            connector: projection from the Q-Former width to the LLM width (BLIP-2's
                `language_projection`, Cheetah's `llama_proj`); built with (Q-Former width,
                LLM width).
            vpgc: add Cheetah's VPG-C (new queries + two zero-initialised projections).
            update_layer: the decoder layer at whose input VPG-C runs (default: half the depth,
                16 of 32 as Cheetah).
            image_aspect: how images become squares: `resize` (BLIP-2), `pad` or `crop`.
        """
        super().__init__()
        if qformer.encoder_hidden_size != vision.out_dim:
            raise ValueError(
                f"the Q-Former cross-attends to {qformer.encoder_hidden_size}-d features but the "
                f"vision tower gives {vision.out_dim}-d ones; pair them from the same checkpoint"
            )
        self.vision = vision
        self.qformer = qformer
        self.llm = llm
        self.connector = connector(qformer.hidden_size, llm.hidden_size)
        self.image_aspect = image_aspect
        self.vpgc: VPGC | None = None
        self._context: VPGCContext | None = None  # applied in the LLM calls of its block
        if vpgc:
            layers = layer_list(llm.model)
            depth = len(layers)
            self.update_layer = depth // 2 if update_layer is None else update_layer
            if not 0 <= self.update_layer < depth:
                raise ValueError(
                    f"update_layer={self.update_layer} but the LLM has decoder layers 0..{depth - 1}"
                )
            self.vpgc = VPGC(llm.hidden_size, qformer.hidden_size, qformer.query_tokens)
            layers[self.update_layer].register_forward_pre_hook(self._vpgc_hook, with_kwargs=True)

    def parts(self) -> dict[str, nn.Module]:
        """`vision`, `qformer`, `connector`, `llm` and, with VPG-C, `vpgc`."""
        parts = {
            "vision": self.vision,
            "qformer": self.qformer,
            "connector": self.connector,
            "llm": self.llm,
        }
        if self.vpgc is not None:
            parts["vpgc"] = self.vpgc
        return parts

    def default_frozen(self) -> list[str]:
        """Everything but VPG-C (Cheetah); without VPG-C, `vision` and `llm` (BLIP-2 stage 2)."""
        return list(FROZEN_WITH_VPGC if self.vpgc is not None else FROZEN_WITHOUT_VPGC)

    # --- media ----------------------------------------------------------------------------
    def media_spec(self) -> QFormerMediaSpec:
        v = self.vision
        transform = ImageTransform(v.image_size, v.image_mean, v.image_std, self.image_aspect)
        return QFormerMediaSpec(transform, self.qformer.num_queries)

    def encode_images(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Vision features `[N, S, D_v]` and LLM tokens `[N, Q, D_llm]` of images `[N, 3, H, W]`."""
        features = self.vision(pixel_values)
        return features, self.connector(self.qformer(features))

    # --- forward ------------------------------------------------------------------------------
    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D_llm]
        """Token embeddings of the batch with every image's query outputs at its placeholders."""
        return self.vpgc_inputs(batch, image_token_id)[0]

    def prepare(self, batch: Batch, image_token_id: int) -> tuple[Tensor, AbstractContextManager]:
        """The embeddings, and VPG-C's context for the one LLM call of a forward."""
        embeds, context = self.vpgc_inputs(batch, image_token_id)
        return embeds, self.vpgc_context(context)

    def prefill(self, batch: Batch, image_token_id: int) -> Prefill:
        """The prompts' embeddings and, with VPG-C, its context for the rows the generator runs."""
        embeds, context = self.vpgc_inputs(batch, image_token_id)
        if context is None:
            return Prefill(embeds, batch.attention_mask)
        return Prefill(
            embeds,
            batch.attention_mask,
            context=lambda rows: self.vpgc_context(_select_rows(context, rows)),
        )

    def vpgc_inputs(self, batch: Batch, image_token_id: int) -> tuple[Tensor, VPGCContext | None]:
        """The embeddings `[B, L, D_llm]` and, with VPG-C and images, the batch's VPG-C context."""
        embeds = self.llm.embed(batch.input_ids)
        features = tokens = None
        if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
            features, tokens = self.encode_images(batch.pixel_values)
        elif joins_collectives(self):
            size = self.vision.image_size
            blank, blank_tokens = self.encode_images(embeds.new_zeros(1, 3, size, size))
            unused = [blank_tokens]
            if self.vpgc is not None:
                instruction = embeds.new_zeros(1, embeds.shape[-1])
                unused.append(self.vpgc(instruction, blank, self.qformer))
            embeds = with_unused(embeds, *unused)
        embeds = scatter_media(
            embeds, batch.input_ids, image_token_id, tokens, batch.views_per_sample, batch.ids
        )
        if self.vpgc is None or features is None:
            return embeds, None
        return embeds, self.vpgc_batch_context(batch, image_token_id, features)

    # --- VPG-C ----------------------------------------------------------------------------
    def vpgc_batch_context(
        self, batch: Batch, image_token_id: int, features: Tensor
    ) -> VPGCContext:
        """Where each image of the batch sits and which instruction token conditions it.

        A sample's instruction token is the one before its first trained label (Cheetah's
        `input_part_targets_len`); a sample without trained labels (a prompt) uses its last
        token, as generation does. In a packed row (`batch.seq_lens`) each sample has its own.
        """
        n_queries = self.qformer.num_queries
        rows, positions, instruction, ends_of_rows = [], [], [], []
        for b in range(len(batch)):
            if batch.views_per_sample[b] == 0:
                continue
            image_pos = (batch.input_ids[b] == image_token_id).nonzero().squeeze(1)
            spans = image_pos.view(-1, n_queries)  # [n_b, Q], the row's images in order
            starts, ends = self._segments(batch, b)
            firsts = self._instruction_positions(batch, b, starts, ends)
            ends_of_rows.append(ends)
            for span in spans:
                segment = bisect.bisect_right(starts, int(span[0])) - 1
                rows.append(b)
                positions.append(span)
                instruction.append(firsts[segment])
        device = batch.input_ids.device
        return VPGCContext(
            rows=torch.tensor(rows, device=device),
            positions=torch.stack(positions),
            instruction=torch.tensor(instruction, device=device),
            vision=features,
            extent=(max(rows) + 1, max(ends[-1] for ends in ends_of_rows)),
        )

    @staticmethod
    def _segments(batch: Batch, b: int) -> tuple[list[int], list[int]]:
        """Start and end positions of the samples of row `b` (one sample unless packed)."""
        if batch.seq_lens is None:
            return [0], [batch.input_ids.shape[1]]
        starts, ends, pos = [], [], 0
        for n in batch.seq_lens[b]:
            starts.append(pos)
            pos += n
            ends.append(pos)
        return starts, ends

    @staticmethod
    def _instruction_positions(
        batch: Batch, b: int, starts: Sequence[int], ends: Sequence[int]
    ) -> list[int]:
        """The instruction position of each sample of row `b`."""
        real = batch.attention_mask[b].bool()
        trained = batch.labels[b] != -100 if batch.labels is not None else torch.zeros_like(real)
        out = []
        for start, end in zip(starts, ends, strict=True):
            labelled = trained[start:end].nonzero()
            if len(labelled):
                out.append(max(start + int(labelled[0]) - 1, start))
            else:
                present = real[start:end].nonzero()
                out.append(start + int(present[-1]) if len(present) else end - 1)
        return out

    def apply_vpgc(self, hidden: Tensor, context: VPGCContext) -> Tensor:  # [B, L, D] -> same
        """`hidden` with every image's VPG-C residual added onto its token positions."""
        rows, length = context.extent
        if hidden.shape[0] < rows or hidden.shape[1] < length:
            raise ValueError(
                f"the VPG-C context is for {rows} rows of {length} tokens but the decoder layer "
                f"got hidden states of shape {tuple(hidden.shape[:2])}; it belongs to another batch"
            )
        instruction = hidden[context.rows, context.instruction]  # [N, D]
        delta = self.vpgc(instruction, context.vision, self.qformer)  # [N, Q, D]
        where = context.rows[:, None].expand_as(context.positions)
        return hidden.index_put((where, context.positions), delta.to(hidden.dtype), accumulate=True)

    @contextmanager
    def vpgc_context(self, context: VPGCContext | None) -> Iterator[None]:
        """Apply `context` at the update layer during the LLM calls inside this block."""
        previous, self._context = self._context, context
        try:
            yield
        finally:
            self._context = previous

    def _vpgc_hook(self, layer: nn.Module, args: tuple, kwargs: dict):
        """Decoder-layer pre-hook: add VPG-C's residual to the layer's input while a context is
        active (training and scoring forwards, the generator's passes over whole prompts)."""
        if self._context is None:
            return None
        if args:
            return (self.apply_vpgc(args[0], self._context), *args[1:]), kwargs
        kwargs["hidden_states"] = self.apply_vpgc(kwargs["hidden_states"], self._context)
        return args, kwargs

    # --- FLOPs ----------------------------------------------------------------------------
    def step_flops(self, batch: Batch, head_tokens: int | None) -> float:
        """Training FLOPs of one batch (BLIP-2; Cheetah's VPG-C), forward + backward.

        Per image: the vision tower on its tokens (BLIP-2: CLS + patches), the Q-Former
        (`qformer_flops`), the projection on its Q outputs. The LLM on the batch's tokens. With
        VPG-C, per image at decoder layer `update_layer`: `qformer_proj` on one token, the
        Q-Former again, `llm_proj` on Q tokens; when nothing before VPG-C trains (Cheetah), the
        LLM's backward stops at `update_layer`.
        """
        n = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        vision, qformer, connector, vpgc = self.vision, self.qformer, self.connector, self.vpgc
        tokens = self.vision_tokens()[0]  # BLIP-2: CLS + patches
        queries = qformer.num_queries
        t_vision, t_qformer, t_connector, t_llm = map(
            trains, (vision, qformer, connector, self.llm)
        )
        t_vpgc = vpgc is not None and trains(vpgc)
        flops = matmul_flops(vision, n * tokens, t_vision)
        config = getattr(getattr(vision, "model", None), "config", None)
        if config is not None:
            layers, width = config.num_hidden_layers, config.hidden_size
            flops += layers * attention_flops(n, tokens, tokens, width, t_vision, t_vision)
        flops += qformer_flops(qformer, n, tokens, t_vision or t_qformer, t_vision)
        into_llm = t_vision or t_qformer or t_connector  # the image tokens need gradients
        flops += matmul_flops(connector, n * queries, into_llm)
        grad_hidden = into_llm or t_llm  # every decoder layer's input needs gradients
        branch = vpgc is not None and n > 0 and (t_vpgc or t_vision or t_qformer or grad_hidden)
        grad_from = 0 if grad_hidden else (self.update_layer if branch else None)
        flops += llm_step_flops(self.llm, batch, grad_from, head_tokens)
        if vpgc is not None and n > 0:
            flops += weight_flops(vpgc.qformer_proj.weight, n, grad_hidden)
            flops += qformer_flops(qformer, n, tokens, branch, t_vision)
            flops += weight_flops(vpgc.llm_proj.weight, n * queries, branch)
        return flops


def _select_rows(context: VPGCContext, kept: list[int]) -> VPGCContext:
    """`context` for a batch of the rows `kept` of its batch (images of other rows left out)."""
    size = max(context.extent[0], max(kept, default=-1) + 1)
    new_row = torch.full((size,), -1, dtype=torch.long, device=context.rows.device)
    new_row[torch.tensor(kept, device=context.rows.device)] = torch.arange(
        len(kept), device=context.rows.device
    )
    images = new_row[context.rows] >= 0
    return VPGCContext(
        rows=new_row[context.rows][images],
        positions=context.positions[images],
        instruction=context.instruction[images],
        vision=context.vision[images],
        extent=(len(kept), context.extent[1]),
    )


def qformer_flops(
    qformer: nn.Module, images: int, memory: int, grad_queries: bool, grad_memory: bool
) -> float:
    """One pass of a BLIP-2 Q-Former (`lmm.components.qformer.QFormer`) over `images` images.

    Its Q queries run through self-attention, the query side of cross-attention and the FFN;
    the cross-attention keys and values are projections of the `memory` vision tokens.
    `grad_queries`: the query stream needs gradients (something before or in it trains);
    `grad_memory`: the vision features need them (the vision tower trains).
    """
    queries = qformer.num_queries
    flops = 0.0
    grad_kv = grad_memory
    for name, m in qformer.named_modules():
        if isinstance(m, nn.Linear):
            on_memory = name.endswith(_MEMORY_SIDE)
            tokens = images * (memory if on_memory else queries)
            flops += weight_flops(m.weight, tokens, grad_memory if on_memory else grad_queries)
            grad_kv = grad_kv or (on_memory and m.weight.requires_grad)
    config = qformer.model.config
    width, layers = config.hidden_size, config.num_hidden_layers
    cross = len(range(0, layers, config.cross_attention_frequency))
    flops += layers * attention_flops(images, queries, queries, width, grad_queries, grad_queries)
    flops += cross * attention_flops(images, queries, memory, width, grad_queries, grad_kv)
    return flops
