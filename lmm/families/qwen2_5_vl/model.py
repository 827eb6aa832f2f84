"""Qwen25VLModel: the math of Qwen2.5-VL (window-attention ViT → 2 × 2 patch merger → M-RoPE Qwen2).

The parts are transformers' own modules (`Qwen2_5_VisionTransformerPretrainedModel`'s patch
embedding and blocks, its `merger`, `Qwen2_5_VLTextModel` and the `lm_head`), loaded with
`Qwen2_5_VLForConditionalGeneration.from_pretrained` and held apart, so that vision, connector
and LLM freeze and take learning rates on their own.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import (
    GenerationMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.utils import cached_file
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from lmm.components.attention import resolve_attention
from lmm.components.flops import attention_flops, llm_step_flops, matmul_flops, trains
from lmm.components.language import CausalLM
from lmm.components.merge import scatter_items
from lmm.components.pretrained import from_pretrained, load_config
from lmm.data.batch import Batch
from lmm.families.model import FamilyModel
from lmm.families.qwen2_5_vl.media import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    Qwen25VLMediaSpec,
    temporal_rows,
)
from lmm.families.qwen2_5_vl.positions import Grid, rope_index
from lmm.generation.decode import Prefill
from lmm.training.strategies import FSDP2Config, apply_fsdp2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

IMAGE_PAD = "<|image_pad|>"


class Qwen25VLVision(nn.Module):
    """The ViT: 3-D patch embedding, 2-D rotary positions, window- and full-attention blocks.

    `forward` is `Qwen2_5_VisionTransformerPretrainedModel.forward` without its merger: the
    hidden states come back in the order of the input patch rows (merge windows in order).
    """

    def __init__(self, visual: Qwen2_5_VisionTransformerPretrainedModel):
        """
        Args:
            visual: transformers' vision tower; its patch embedding, rotary embedding and
                blocks are taken (not its merger, which is the connector).
        """
        super().__init__()
        self.config = visual.config
        self.patch_embed = visual.patch_embed
        self.rotary_pos_emb = visual.rotary_pos_emb
        self.blocks = visual.blocks

    def forward(self, rows: Tensor, grid_thw: Tensor) -> Tensor:  # [N, 3·T·P·P] -> [N, D_vit]
        c = self.config
        merge_unit = c.spatial_merge_size**2
        position_ids = get_vision_position_ids(grid_thw, c.spatial_merge_size)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, c)
        window_index, cu_windows = get_vision_window_index(
            grid_thw, c.spatial_merge_size, c.window_size, c.patch_size
        )
        max_window = get_max_seqlen(cu_windows, c, kwargs={}, kwarg_name="max_window_seqlen")
        hidden = self.patch_embed(rows)
        # patch rows window by window (whole merge groups move), and back after the blocks
        group = torch.arange(merge_unit, device=window_index.device)
        order = (window_index[:, None] * merge_unit + group).flatten().to(rows.device)
        hidden = hidden[order]
        cos, sin = self.rotary_pos_emb(hidden, position_ids)
        rotary = (cos[order], sin[order])
        for i, block in enumerate(self.blocks):
            full = i in c.fullatt_block_indexes
            hidden = block(
                hidden,
                cu_seqlens=cu_seqlens if full else cu_windows,
                max_seqlen=max_seqlen if full else max_window,
                position_embeddings=rotary,
            )
        return hidden[torch.argsort(order)]

    def attention_lengths(self, grid_thw: Tensor) -> tuple[list[int], list[int]]:
        """Sequence lengths the full-attention and the window-attention blocks attend over."""
        c = self.config
        cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, c)
        _, cu_windows = get_vision_window_index(
            grid_thw, c.spatial_merge_size, c.window_size, c.patch_size
        )
        return cu_seqlens.diff().tolist(), cu_windows.diff().tolist()


class Qwen25VLTextForCausalLM(Qwen2_5_VLPreTrainedModel, GenerationMixin):
    """Qwen2.5-VL's text decoder (M-RoPE) and `lm_head` as a causal LM: `model.*`, `lm_head.*`.

    transformers has no causal LM class for `qwen2_5_vl_text`; position ids may be `[B, L]`
    (text: the same on the three M-RoPE rows), `[3, B, L]`, or `[4, B, L]` with the text
    positions first (packed rows: attention finds the samples from them).
    """

    config: Qwen2_5_VLTextConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: Qwen2_5_VLTextConfig):
        super().__init__(config)
        self.model = Qwen2_5_VLTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def of(cls, decoder: Qwen2_5_VLTextModel, lm_head: nn.Linear) -> Qwen25VLTextForCausalLM:
        """The causal LM around an already built decoder and head (a tied head stays tied)."""
        with torch.device("meta"):
            lm = cls(decoder.config)
        lm.model, lm.lm_head = decoder, lm_head
        return lm

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> Qwen2_5_VLTextModel:
        return self.model

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(
            logits=self.lm_head(hidden), cache=out.cache, hidden_states=out.hidden_states
        )


class Qwen25VLLanguage(CausalLM):
    """`CausalLM`'s members (run, embed, logits, resize_vocab) over `Qwen25VLTextForCausalLM`."""

    def __init__(self, model: Qwen25VLTextForCausalLM):
        """
        Args:
            model: the text decoder and head, built by `Qwen25VLModel`.
        """
        nn.Module.__init__(self)
        self.model = model

    @property
    def selects_logits(self) -> bool:
        return True  # logits are `lm_head(decoder(...))`


class Qwen25VLModel(FamilyModel):
    """Qwen2.5-VL from one transformers `Qwen2_5_VLForConditionalGeneration` folder or hub id.

    One `path` rather than separate vision / LLM folders: Qwen2.5-VL's tower, merger and
    decoder are trained together and published as one checkpoint (either key layout:
    transformers 5's `model.visual.*` / `model.language_model.*` or the older `visual.*` /
    `model.*`). Images, video frames and token counts follow `media_spec()`; the LLM runs on
    M-RoPE positions (`position_ids`).
    """

    default_image_token = IMAGE_PAD  # the feature slot of images and videos alike

    def __init__(
        self,
        path: str,
        weights: bool = True,
        dtype: str = "float32",
        attn_implementation: str = "auto",
        vision_attn_implementation: str = "auto",
        video_fps: float = 2.0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
    ):
        """
        Args:
            path: folder or hub id of a transformers Qwen2.5-VL checkpoint (its config.json,
                weights and, if any, preprocessor_config.json).
            weights: read the checkpoint's weights; False builds the model from its
                config.json alone (random weights, e.g. when `init_from` loads lmm's layout).
            dtype: parameter dtype: `float32`, `bfloat16` or `float16`.
            attn_implementation: the LLM's attention (lmm.components.language.CausalLM).
            vision_attn_implementation: the ViT's: `auto` (flash-attn 2 on CUDA, else sdpa),
                `sdpa` or `eager`.
            video_fps: frames per second videos are sampled at (the data's `VideoRef` fps):
                a pair of frames spans `2 / video_fps` s, `tokens_per_second` temporal positions
                a second (Qwen's processor default: 2).
            min_pixels: an image's smallest resized pixel count (default: the checkpoint's
                preprocessor_config.json, else 56·56).
            max_pixels: an image's largest resized pixel count (default: the checkpoint's, else
                28·28·1280).
            video_min_pixels: a video frame's smallest resized pixel count (default: the
                checkpoint's video_preprocessor_config.json, else Qwen2VLVideoProcessor's
                128·28·28).
            video_max_pixels: a video frame's largest (default: the checkpoint's, else
                768·28·28; no total-video budget).
        """
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        attn = {
            "text_config": resolve_attention(attn_implementation, causal_lm=True),
            "vision_config": resolve_attention(vision_attn_implementation),
        }
        kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn)
        if weights:
            hf = from_pretrained(Qwen2_5_VLForConditionalGeneration, path, **kwargs)
        else:
            config = load_config(path, Qwen2_5_VLConfig)
            hf = Qwen2_5_VLForConditionalGeneration._from_config(config, **kwargs)
        self.path = path
        self.config: Qwen2_5_VLConfig = hf.config
        self.vision = Qwen25VLVision(hf.model.visual)
        self.connector = hf.model.visual.merger
        text_lm = Qwen25VLTextForCausalLM.of(hf.model.language_model, hf.lm_head)
        # the head is tied by the outer config (3B); the causal LM reads its own when resizing
        text_lm.config.tie_word_embeddings = self.config.tie_word_embeddings
        self.llm = Qwen25VLLanguage(text_lm)
        pre = _preprocessor(path, "preprocessor_config.json")
        video = _preprocessor(path, "video_preprocessor_config.json")
        v = self.config.vision_config
        self.spec = Qwen25VLMediaSpec(
            patch_size=v.patch_size,
            merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size,
            min_pixels=min_pixels or pre.get("min_pixels", MIN_PIXELS),
            max_pixels=max_pixels or pre.get("max_pixels", MAX_PIXELS),
            video_min_pixels=video_min_pixels or video.get("min_pixels", VIDEO_MIN_PIXELS),
            video_max_pixels=video_max_pixels or video.get("max_pixels", VIDEO_MAX_PIXELS),
            mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            std=tuple(pre.get("image_std", CLIP_STD)),
        )
        self.video_fps = video_fps

    # --- the family contract ----------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    def media_spec(self) -> Qwen25VLMediaSpec:
        return self.spec

    def grids(self, batch: Batch) -> list[tuple[Grid, int]]:
        """Per media item: its patch grid (t, h, w) for the ViT and its frame count."""
        spec = self.spec
        sizes = [] if batch.image_sizes is None else batch.image_sizes.tolist()
        views = list(batch.views_per_media)
        if not (len(sizes) == len(views) == len(batch.media_modes)):
            raise ValueError(
                f"batch has {len(sizes)} image sizes, {len(views)} views_per_media and "
                f"{len(batch.media_modes)} media modes; build batches with lmm.data collators"
            )
        out = []
        for size, mode, n in zip(sizes, batch.media_modes, views, strict=True):
            gh, gw = spec.grid(tuple(size), mode)
            frames, rest = divmod(n, gh * gw)
            if rest or frames < 1 or (mode != "video" and frames != 1):
                raise ValueError(
                    f"a {mode} of {size[0]}x{size[1]} px has {n} patch rows, but Qwen2.5-VL "
                    f"cuts it into {gh}x{gw} patches a frame; the data was processed with "
                    "another media spec"
                )
            out.append(((spec.temporal_grid(frames), gh, gw), frames))
        return out

    def vision_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """transformers' `pixel_values` `[Σ t·h·w, 3·T·P·P]` and `grid_thw` `[M, 3]` of a batch."""
        grids = self.grids(batch)
        chunks = batch.pixel_values.split(list(batch.views_per_media))
        temporal = self.spec.temporal_patch_size
        rows = [temporal_rows(x, f, temporal) for x, (_, f) in zip(chunks, grids, strict=True)]
        grid_thw = torch.tensor([g for g, _ in grids], device=batch.pixel_values.device)
        return torch.cat(rows), grid_thw

    def encode(self, rows: Tensor, grid_thw: Tensor) -> Tensor:  # -> [Σ t·h·w / 4, D_llm]
        """Merged features of every media item, items in order."""
        dtype = self.vision.patch_embed.proj.weight.dtype
        return self.connector(self.vision(rows.to(dtype), grid_thw))

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D]
        """Token embeddings with every media item's merged features at its placeholders."""
        embeds = self.llm.embed(batch.input_ids)
        if batch.pixel_values is None or batch.pixel_values.shape[0] == 0:
            if self.training and torch.distributed.is_initialized():
                # A rank without media still runs the tower and merger (on one blank 2 x 2
                # patch window) with weight 0: every FSDP / DDP rank joins the same collectives.
                width = self.vision.patch_embed.proj.weight[0].numel()
                merge = self.spec.merge_size
                blank = embeds.new_zeros(merge * merge, width)
                grid = torch.tensor([[1, merge, merge]], device=embeds.device)
                embeds = embeds + 0.0 * self.encode(blank, grid).sum()
            return embeds
        rows, grid_thw = self.vision_inputs(batch)
        features = self.encode(rows, grid_thw)
        per_item = (grid_thw.prod(-1) // self.spec.merge_size**2).tolist()
        per_row = batch.items_per_row()
        return scatter_items(
            embeds, batch.input_ids, image_token_id, features.split(per_item), per_row, batch.ids
        )

    def intervals(self, batch: Batch) -> list[float]:
        """Temporal position step per media item: `tokens_per_second · T / video_fps` for videos."""
        tps = self.config.vision_config.tokens_per_second
        step = tps * self.spec.temporal_patch_size / self.video_fps
        return [step if m == "video" else 1.0 for m in batch.media_modes]

    def position_ids(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [3 or 4, B, L]
        """M-RoPE positions (lmm.families.qwen2_5_vl.positions), per sample from 0: `[3, B, L]`,
        or for packed rows `[4, B, L]` with the restarting text positions first (transformers'
        packed form: attention finds the samples there)."""
        merge = self.spec.merge_size
        grids = [(t, h // merge, w // merge) for (t, h, w), _ in self.grids(batch)]
        positions = rope_index(
            batch.input_ids,
            None if batch.packed else batch.attention_mask,
            batch.seq_lens,
            image_token_id,
            grids,
            self.intervals(batch),
            batch.ids,
        )
        if batch.packed:
            positions = torch.cat([batch.position_ids[None].to(positions.device), positions])
        return positions

    def prefill(self, batch: Batch, image_token_id: int) -> Prefill:
        """A left-padded prompt batch for the generator: embeddings `[B, L, D]` and M-RoPE
        positions `[3, B, L]`. Decoding goes on from `positions[..., -1] + 1` on all three
        rows: a prompt ends in text, whose position is the largest of its row, which is
        transformers' `rope_deltas` rule (max + 1, then one per token)."""
        embeds = self.embed(batch, image_token_id)
        return Prefill(embeds, batch.attention_mask, self.position_ids(batch, image_token_id))

    def shard(self, mesh: DeviceMesh, fsdp: FSDP2Config) -> None:
        """FSDP2: every ViT block, the ViT, every decoder layer, then this model as the root."""
        apply_fsdp2(self, self.vision, self.llm.model, mesh, fsdp)

    def step_flops(self, batch: Batch, head_tokens: int | None = None) -> float:
        """Training FLOPs of a batch (forward + backward) for the MFU monitor.

        ViT: the 3-D patch embedding and the blocks' matmuls on every patch, attention per
        window (window blocks) or per frame pair (full blocks); merger on the merged tokens;
        LLM as `lmm.components.flops.llm_step_flops` counts it.
        """
        # the LLM, with gradients from the tower / merger if they train
        upstream = any(trains(part) for part in self.parts().values())
        flops = llm_step_flops(self.llm, batch, 0 if upstream else None, head_tokens)
        if batch.pixel_values is None or batch.pixel_values.shape[0] == 0:
            return flops
        rows, grid_thw = self.vision_inputs(batch)
        n = rows.shape[0]
        grad_vision = trains(self.vision)
        conv = self.vision.patch_embed.proj.weight
        flops += n * conv.numel() * (2 + 2 * conv.requires_grad)
        flops += matmul_flops(self.vision.blocks, n, grad_vision)
        full, windows = self.vision.attention_lengths(grid_thw)
        width = self.config.vision_config.hidden_size
        for i in range(len(self.vision.blocks)):
            spans = full if i in self.config.vision_config.fullatt_block_indexes else windows
            flops += sum(
                attention_flops(1, k, k, width, grad_vision, grad_vision) for k in spans if k
            )
        merged = n // self.spec.merge_size**2
        flops += matmul_flops(self.connector, merged, grad_vision or trains(self.connector))
        return flops


def _preprocessor(path: str, name: str) -> dict:
    """A processor config of the checkpoint as plain values (min/max pixels, mean, std)."""
    file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    if file is None:
        return {}
    with open(file) as f:
        pre = json.load(f)
    size = pre.get("size") or {}
    out = {k: pre[k] for k in ("image_mean", "image_std") if k in pre}
    minimum = pre.get("min_pixels", size.get("shortest_edge"))
    maximum = pre.get("max_pixels", size.get("longest_edge"))
    if minimum:
        out["min_pixels"] = int(minimum)
    if maximum:
        out["max_pixels"] = int(maximum)
    return out
