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

How the batch reaches the decoder layer: `prepare` builds a `VPGCContext` (image positions,
instruction positions, vision features) next to the embeddings; `forward` makes it active for
its one LLM call, and a forward pre-hook on the decoder layer applies it. Generation prefills
each prompt alone through the bare LLM, so the prompts and their contexts are registered with
`prompts(...)` and a pre-hook on the LLM picks the context whose prompt is being prefilled.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmm.components.connectors import Connector, LinearConnector
from lmm.components.language import CausalLM
from lmm.components.merge import scatter_media
from lmm.components.qformer import QFormer
from lmm.components.vision import VisionEncoder
from lmm.data.batch import Batch
from lmm.data.media import ImageTransform
from lmm.data.processor import MediaSpec
from lmm.families.base import FamilyModel
from lmm.training.strategies import layer_list
from lmm.utils.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class QFormerMediaSpec(MediaSpec):
    """Tokens per image (the Q-Former's query count, whatever the size) and the image transform."""

    transform: ImageTransform
    num_queries: int
    vision: VisionEncoder  # for throughput accounting (tokens the encoder runs on)

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
        if not queries.any():
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
        self._context: VPGCContext | None = None  # applied at the next prefill of the LLM
        self._prompts: list[tuple[Tensor, VPGCContext]] | None = None  # generation prompts
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
            llm.model.register_forward_pre_hook(self._select_prompt, with_kwargs=True)

    # --- media ----------------------------------------------------------------------------
    def media_spec(self) -> QFormerMediaSpec:
        v = self.vision
        transform = ImageTransform(v.image_size, v.image_mean, v.image_std, self.image_aspect)
        return QFormerMediaSpec(transform, self.qformer.num_queries, v)

    def encode_images(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Vision features `[N, S, D_v]` and LLM tokens `[N, Q, D_llm]` of images `[N, 3, H, W]`."""
        features = self.vision(pixel_values)
        return features, self.connector(self.qformer(features))

    # --- forward --------------------------------------------------------------------------
    def forward(
        self,
        batch: Batch,
        image_token_id: int,
        attention_mask: Tensor | None,
        return_hidden: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Logits `[B, L, V]`: embeddings with the images scattered in, through the LLM (+VPG-C).

        With `return_hidden`, the LLM's last hidden states `[B, L, D]` instead (score heads);
        with `logits_at` (bool `[B, L]`), the logits at those positions only, `[N, V]`.
        """
        embeds, context = self.prepare(batch, image_token_id)
        with self.vpgc_context(context):
            return self.llm.run(
                embeds, attention_mask, batch.position_ids, return_hidden, logits_at=logits_at
            )

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D_llm]
        """Token embeddings of the batch with every image's query outputs at its placeholders."""
        return self.prepare(batch, image_token_id)[0]

    def prepare(self, batch: Batch, image_token_id: int) -> tuple[Tensor, VPGCContext | None]:
        """The embeddings `[B, L, D_llm]` and, with VPG-C and images, the batch's VPG-C context."""
        embeds = self.llm.embed(batch.input_ids)
        features = tokens = None
        if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
            features, tokens = self.encode_images(batch.pixel_values)
        elif self.training and torch.distributed.is_initialized():
            # A rank whose batch has no image still runs every media module on a blank image,
            # with a zero weight: sharded (FSDP) and DDP ranks must take part in the same
            # collectives and give every trained parameter a gradient.
            size = self.vision.image_size
            blank, blank_tokens = self.encode_images(embeds.new_zeros(1, 3, size, size))
            unused = blank_tokens.sum()
            if self.vpgc is not None:
                instruction = embeds.new_zeros(1, embeds.shape[-1])
                unused = unused + self.vpgc(instruction, blank, self.qformer).sum()
            embeds = embeds + 0.0 * unused
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

    @contextmanager
    def prompts(self, prompts: Sequence[tuple[Tensor, VPGCContext]]) -> Iterator[None]:
        """Generation: prefilling a prompt batch (`[B, L, D]` embeddings) applies its context."""
        previous, self._prompts = self._prompts, list(prompts)
        try:
            yield
        finally:
            self._prompts = previous

    def _select_prompt(self, llm: nn.Module, args: tuple, kwargs: dict) -> None:
        """LLM pre-hook in generation: make the context of the prompt being prefilled active."""
        if self._prompts is None:
            return
        self._context = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or not _empty(kwargs.get("past_key_values")):
            return  # a decoding step: the cache already holds VPG-C's effect
        for prompt, context in self._prompts:  # prompt: [B, L, D], the batch's prefill input
            rows, n = prompt.shape[:2]
            if embeds.shape[1] < n or embeds.shape[0] > rows:
                continue
            if embeds.shape[0] == rows and torch.equal(embeds[:, :n], prompt):
                self._context = context  # a prefill, or a no-cache step of these prompts
                return
            # a no-cache step after some rows finished: the rows left, in order
            kept = _matching_rows(embeds[:, :n], prompt)
            if kept is not None:
                self._context = _select_rows(context, kept)
                return

    def _vpgc_hook(self, layer: nn.Module, args: tuple, kwargs: dict):
        """Decoder-layer pre-hook: add VPG-C's residual to the layer's input during a prefill."""
        if self._context is None or not _empty(kwargs.get("past_key_values"), self.update_layer):
            return None
        if args:
            return (self.apply_vpgc(args[0], self._context), *args[1:]), kwargs
        kwargs["hidden_states"] = self.apply_vpgc(kwargs["hidden_states"], self._context)
        return args, kwargs


def _matching_rows(embeds: Tensor, prompt: Tensor) -> list[int] | None:
    """The rows of `prompt` that `embeds`' rows are, in order (each matched once), or None."""
    kept: list[int] = []
    start = 0
    for row in embeds:
        found = next(
            (r for r in range(start, prompt.shape[0]) if torch.equal(row, prompt[r])), None
        )
        if found is None:
            return None
        kept.append(found)
        start = found + 1
    return kept


def _select_rows(context: VPGCContext, kept: list[int]) -> VPGCContext:
    """`context` for a batch of the rows `kept` of its batch (images of other rows left out)."""
    new_row = torch.full((context.extent[0],), -1, dtype=torch.long, device=context.rows.device)
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


def _empty(cache, layer: int = 0) -> bool:
    """True if there is no KV cache or it holds nothing yet for `layer` (a prefill)."""
    if cache is None:
        return True
    length = getattr(cache, "get_seq_length", None)
    return length is None or length(layer) == 0
