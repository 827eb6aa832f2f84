"""LMMModule: the Lightning loop every family shares (steps, logging, freezing, optimizers, generation)."""

from __future__ import annotations

import functools
import inspect
import random
import re
import time
import zlib
from collections.abc import Iterator, Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from lmm.components.attention import PACKED_SDPA
from lmm.components.language import CausalLM
from lmm.components.losses import selected_lm_loss, trained_positions
from lmm.components.pretrained import reads_weights
from lmm.components.score_head import ScoreConfig, ScoreHead, ScoreMetrics
from lmm.data.batch import Batch
from lmm.data.packing import block_causal_mask
from lmm.data.processor import MediaSpec
from lmm.data.sample import IMAGE_MARKER
from lmm.data.tokenization import load_tokenizer
from lmm.evaluation.metrics import ExactMatch, normalize_answer
from lmm.evaluation.runner import write_results
from lmm.generation.decode import Step, cut_at_stop, kernels, stream_tokens
from lmm.training.checkpoint import init_from_checkpoint
from lmm.training.lora import LoraConfig, apply_lora
from lmm.training.optim import WarmupCosine, param_groups
from lmm.training.strategies import (
    FSDP2Config,
    apply_fsdp2,
    broadcast_weights,
    has_meta,
    mp_policy,
)
from lmm.utils.logging import get_logger

log = get_logger(__name__)


@functools.cache
def forward_arguments(cls: type[nn.Module]) -> frozenset[str]:
    """The argument names of a module class's `forward` (looked up once per class)."""
    return frozenset(inspect.signature(cls.forward).parameters)


class FamilyModel(nn.Module):
    """The math of a family: `embed` puts the media into the token embeddings, `llm` (a
    `CausalLM`) runs them. Its `forward` is what the Lightning steps call (the FSDP2 root)."""

    llm: CausalLM

    def media_spec(self) -> MediaSpec:
        raise NotImplementedError

    def embed(self, batch: Batch, image_token_id: int) -> Tensor:  # -> [B, L, D]
        raise NotImplementedError

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
        embeds = self.embed(batch, image_token_id)
        return self.llm.run(
            embeds, attention_mask, batch.position_ids, return_hidden, logits_at=logits_at
        )


class LMMModule(L.LightningModule):
    """Training, validation (loss) and test/predict (generation) steps for any family.

    A family subclass holds its `FamilyModel` as `self.model` and names its `parts()` (named
    sub-modules: vision / connector / llm); `media_spec()`, `embed(batch)` (token embeddings
    with media scattered in), `llm` (the transformers causal LM used for generation) and
    `root_module()` come from the model unless the family overrides them. With `score`, the
    module trains and predicts scores with a `ScoreHead` (part `score`) instead of text; the
    family model's forward then needs a `return_hidden` keyword (docs/families.md).
    """

    def __init__(
        self,
        tokenizer: str,
        image_token: str = IMAGE_MARKER,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: WarmupCosine | None = None,
        part_lr: dict[str, float] | None = None,
        freeze: list[str] | None = None,
        max_new_tokens: int = 32,
        stop_strings: list[str] | None = None,
        fsdp: FSDP2Config | None = None,
        init_from: str | None = None,
        init_include: list[str] | None = None,
        lora: LoraConfig | None = None,
        score: ScoreConfig | None = None,
    ):
        """
        Args:
            tokenizer: folder or hub id of the tokenizer; `<image>` and a pad token are added if missing.
            image_token: the placeholder token that media features replace.
            optimizer: optimizer class and its arguments (its `lr` is the base learning rate).
            scheduler: learning-rate schedule over the run's total steps (none = constant).
            part_lr: learning rate per part (`vision`, `connector`, `llm`), overriding the base.
            freeze: parts whose parameters are not trained.
            max_new_tokens: generation length for test/predict.
            stop_strings: strings that end generation (default: the data template's, plus eos).
            fsdp: how FSDP2 shards the model under `ModelParallelStrategy` (default: fp32 on
                CPU, bf16 params + fp32 reduce on GPU, no activation checkpointing).
            init_from: a checkpoint of an earlier stage (.ckpt or .safetensors) to start from.
            init_include: regexes of the weight names taken from `init_from` (default: all),
                e.g. `["model\\.connector\\..*"]` for stage 2 to take the stage-1 connector.
            lora: LoRA / DoRA / QLoRA adapters on the LLM (docs/lora.md); None trains weights.
            score: a score head on the last non-pad token (VideoScore: regression of 5
                dimensions); the module then trains on scored records and predicts scores.
                None: a chat model (next-token loss, generation).
        """
        super().__init__()
        self.image_token = image_token
        self.tokenizer = load_tokenizer(tokenizer, image_token)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.part_lr = dict(part_lr or {})
        self.freeze_parts = list(freeze or [])
        self.max_new_tokens = max_new_tokens
        self.stop_strings = stop_strings
        self.fsdp = fsdp or FSDP2Config()
        self.init_from = init_from
        self.init_include = list(init_include or [".*"])
        self.lora = lora
        self.score = score
        self.score_head: ScoreHead | None = None  # built by setup_weights (needs the LLM width)
        self.score_metrics = nn.ModuleDict()
        self.test_accuracy = ExactMatch()
        self.task_accuracy = nn.ModuleDict()
        self.predictions: list[dict] = []
        self.skipped_records = 0
        self._sharded = False
        self._step_start = 0.0

    # --- what a family provides -----------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def media_spec(self) -> MediaSpec:
        return self.model.media_spec()

    def embed(self, batch: Batch) -> Tensor:
        return self.model.embed(batch, self.image_token_id)

    @property
    def llm(self) -> nn.Module:
        return self.model.llm.model

    # --- shared ---------------------------------------------------------------------------
    def all_parts(self) -> dict[str, nn.Module]:
        """`parts()` plus the score head (`score`), if any: what freeze, part_lr, the optimizer see.

        LoRA adapts `parts()` only, and leaves the head trainable.
        """
        parts = dict(self.parts())
        if self.score_head is not None:
            parts["score"] = self.score_head
        return parts

    def setup_weights(self) -> None:
        """After a family built its model: score head, stage init from a checkpoint, freezing."""
        if self.score is not None and self.score_head is None:
            self._check_hidden_contract()
            width = self.llm.get_input_embeddings().embedding_dim  # the LLM's hidden width
            self.score_head = ScoreHead(width, self.score)
            self.score_metrics = nn.ModuleDict(
                {split: ScoreMetrics(self.score) for split in ("val", "test")}
            )
        if self.init_from and reads_weights():  # (meta: rank 0's values come after sharding)
            init_from_checkpoint(self, self.init_from, self.init_include)
        self.apply_freeze()
        if self.score_head is not None:
            self._freeze_lm_head()
        if self.lora is not None:
            apply_lora(self, self.lora)

    def _freeze_lm_head(self) -> None:
        """A score model never reads its LM head: freeze it (unless tied to the embeddings).

        It would get no gradient ever; a trainable parameter without one has no optimizer
        state, and a sharded (FSDP2) checkpoint then fails to load.
        """
        head = self.llm.get_output_embeddings()
        if head is not None and head.weight is not self.llm.get_input_embeddings().weight:
            head.requires_grad_(False)

    def apply_freeze(self) -> None:
        """Freeze the parts named in `freeze`, and parameters matching `re:<regex>` entries."""
        parts = self.all_parts()
        patterns = [f[3:] for f in self.freeze_parts if f.startswith("re:")]
        names = [f for f in self.freeze_parts if not f.startswith("re:")]
        unknown = set(names) - set(parts)
        if unknown:
            raise ValueError(
                f"freeze names unknown parts {sorted(unknown)}; parts: {sorted(parts)}, "
                "or give a parameter-name regex as 're:<regex>'"
            )
        for name in names:
            parts[name].requires_grad_(False)
        for pattern in patterns:
            hits = [p for n, p in self.named_parameters() if re.fullmatch(pattern, n)]
            if not hits:
                raise ValueError(f"freeze pattern {pattern!r} matches no parameter")
            for p in hits:
                p.requires_grad_(False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning does not save the RNG states; an exact resume needs them (dropout, sampling).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["lmm_rng"] = {  # plain types and tensors: loadable with weights_only=True
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("lmm_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])

    def attention_mask(self, batch: Batch, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The mask the LLM gets: the 2-D padding mask, or for packed rows a block-diagonal one.

        flash-attn 2 and `sdpa_packed` get no mask for packed rows: they attend within each
        sample, which they find from the restarting position ids.
        """
        if not batch.packed:
            return batch.attention_mask
        impl = self.llm.config._attn_implementation
        if impl in ("flash_attention_2", PACKED_SDPA):
            return None
        mask = block_causal_mask(batch.seq_lens, batch.input_ids.shape[1], batch.input_ids.device)
        if impl == "sdpa":
            return mask
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill(~mask, torch.finfo(dtype).min)  # eager adds the mask

    def forward(self, batch: Batch) -> Tensor:
        """Logits `[B, L, V]` of a batch (padded or packed).

        Runs through the family model's own `forward`, so that FSDP2 gathers its parameters.
        """
        return self.root_module()(batch, self.image_token_id, self.attention_mask(batch))

    def hidden_states(self, batch: Batch) -> Tensor:
        """The LLM's last hidden states `[B, L, D]`: what its `lm_head` reads.

        They come through the family model's own forward (`return_hidden=True`), so that FSDP2
        gathers its parameters.
        """
        mask = self.attention_mask(batch)
        return self.root_module()(batch, self.image_token_id, mask, return_hidden=True)

    def scores(self, batch: Batch) -> Tensor:
        """The score head's raw outputs `[B, n_labels]` at each row's last non-pad token."""
        if self.score_head is None:
            raise ValueError(
                f"{type(self).__name__} has no score head; give `score` (a ScoreConfig) to score"
            )
        if batch.packed:
            raise ValueError(
                f"batch {batch.ids[:2]}...: score heads need padded batches (one sample per row, "
                "scored at its last token), not packed rows; set data.init_args.pack_tokens: null"
            )
        return self.score_head(self.hidden_states(batch), batch.attention_mask)

    def _check_hidden_contract(self) -> None:
        """A score head needs the family model's forward to take `return_hidden`."""
        root = self.root_module()
        if "return_hidden" not in forward_arguments(type(root)):
            raise TypeError(
                f"{type(root).__name__}.forward has no `return_hidden` argument, which a score "
                "head needs (the LLM's last hidden states instead of logits); add it to the "
                "family model (docs/families.md, 'Score heads')"
            )

    def _targets(self, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError(
                f"batch {batch.ids[:2]}... has no score targets, but the module has a score head "
                f"({self.score_head.labels}); train it on scored records (Mantis `classification`: "
                "`prompt` + `labels`), or drop `score` to train a chat model"
            )
        return batch.targets

    def loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Mean next-token loss over the trained tokens of the global batch, and their count
        (with a score head: its mean loss over the samples, and their count).

        With several ranks each rank's sum is divided by the global token count (times the
        world size, which data-parallel gradient averaging divides out again), so the
        gradients equal those of one process on the whole global batch, whatever the split
        of tokens between ranks.
        """
        if self.score_head is not None:
            loss_sum, n = self.score_head.loss(self.scores(batch), self._targets(batch))
        else:
            loss_sum, n = self.lm_loss(batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_initialized():
            n_global = n.detach().clone()
            torch.distributed.all_reduce(n_global)
            return loss_sum * world / n_global.clamp(min=1), n_global
        return loss_sum / n.clamp(min=1), n

    def lm_loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Summed next-token loss of the batch's trained tokens, and their count.

        The family model computes logits only where a next token is trained
        (`logits_at`): prompt, image and pad positions never reach the vocabulary projection.
        """
        at, targets = trained_positions(batch.labels)
        root = self.root_module()
        if "logits_at" in forward_arguments(type(root)):
            logits = root(batch, self.image_token_id, self.attention_mask(batch), logits_at=at)
        else:  # a family model without the argument: every position, then select
            logits = self(batch)[at]
        return selected_lm_loss(logits, targets)

    def logit_positions(self, batch: Batch) -> int:
        """Positions at which a training step of `batch` computes vocabulary logits (for the
        throughput monitor's FLOP count): the trained ones (`lm_loss`), one per row with a
        score head, every real token for an LLM whose head lmm cannot call on its own."""
        if self.score_head is not None:
            return len(batch)
        if not self.model.llm.selects_logits:
            return batch.num_tokens
        return int((batch.labels[:, 1:] != -100).sum())

    def configure_model(self) -> None:
        """Under ModelParallelStrategy, shard the family model with the FSDP2 plan (with
        `fsdp.meta_init`, then give every rank its shard of rank 0's weights)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharding = isinstance(strategy, ModelParallelStrategy) and not self._sharded
        if has_meta(self) and not sharding and not self._sharded:
            raise RuntimeError(
                f"{type(self).__name__} was built on the meta device (fsdp.meta_init on a rank "
                f"other than 0) but the strategy is {type(strategy).__name__}: meta_init needs "
                "the FSDP2 plan (trainer.strategy: fsdp2); drop meta_init for "
                "DDP or DeepSpeed"
            )
        if sharding:
            full_state = None
            if self.fsdp.meta_init and getattr(self.llm, "is_quantized", False):
                raise ValueError(
                    "fsdp.meta_init cannot broadcast a quantized (4-bit / 8-bit) LLM's weights: "
                    "each rank quantizes its own copy when it loads; set "
                    "model.init_args.fsdp.meta_init: false for QLoRA"
                )
            if self.fsdp.meta_init and strategy.global_rank == 0:
                if has_meta(self):
                    raise RuntimeError(
                        "fsdp.meta_init: global rank 0 was built on the meta device, but its "
                        "weights are the ones every rank receives; check RANK / NODE_RANK / "
                        "LOCAL_RANK in the launcher's environment (lmm.components.pretrained."
                        "launched_rank_zero)"
                    )
                full_state = self.state_dict()  # the full tensors, before sharding
            self.shard(self.device_mesh["data_parallel"])
            if self.score_head is not None:  # outside the family model: its own FSDP unit
                mesh = self.device_mesh["data_parallel"]
                policy = mp_policy(self.fsdp, torch.device(mesh.device_type))
                fully_shard(self.score_head, mesh=mesh, mp_policy=policy)
            if self.fsdp.meta_init:
                built_on_meta = has_meta(self)
                broadcast_weights(self, full_state, strategy.root_device)
                log.info(
                    "FSDP2 meta_init: rank %d %s; weights broadcast from rank 0",
                    strategy.global_rank,
                    "built on the meta device" if built_on_meta else "loaded the weights",
                    extra={"all_ranks": True},
                )
            self._sharded = True

    def shard(self, mesh: DeviceMesh) -> None:
        """The family's FSDP2 plan (`apply_fsdp2`): vision layers and tower, decoder layers,
        then the family model as the root."""
        apply_fsdp2(self.root_module(), self.parts().get("vision"), self.llm, mesh, self.fsdp)

    def root_module(self) -> nn.Module:
        """The family's model, the root FSDP unit."""
        return self.model

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        if batch.skipped:
            self.skipped_records += batch.skipped
            self.log("train/skipped_records", float(self.skipped_records), batch_size=len(batch))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.skipped_records:
            log.warning(
                "epoch %d: %d bad training records skipped so far (on_bad_record: skip)",
                self.current_epoch,
                self.skipped_records,
            )

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_start
        if elapsed > 0:
            self.log("train/tokens_per_s", batch.num_tokens / elapsed, batch_size=len(batch))

    # --- validation, generation, test and predict ------------------------------------------
    def validation_step(
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> Tensor | None:
        """Loss on chat validation data; answers scored by the task on a task's dataloader."""
        task = self._loader_task("val", dataloader_idx)
        if task is not None:
            self._score_task(task, batch, "val")
            return None
        if self.score_head is not None:
            return self._score_step(batch, "val")
        loss, _ = self.loss(batch)
        self.log(
            "val/loss",
            loss,
            prog_bar=True,
            batch_size=len(batch),
            sync_dist=True,
            add_dataloader_idx=False,
        )
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_tasks("val")
        self._log_scores("val")

    # --- score heads ------------------------------------------------------------------------
    def _score_step(self, batch: Batch, split: str) -> Tensor | None:
        """Scores of a val/test batch: the loss and metrics where it has targets."""
        scores = self.scores(batch)
        predictions = self.score_head.predictions(scores)
        loss = None
        if batch.targets is not None:
            loss_sum, n = self.score_head.loss(scores, batch.targets)
            loss = loss_sum / n
            self.score_metrics[split].update(predictions, batch.targets)
            self.log(
                f"{split}/loss",
                loss,
                prog_bar=split == "val",
                batch_size=len(batch),
                sync_dist=True,
                add_dataloader_idx=False,
            )
        if split == "test":
            self.predictions.extend(self._score_rows(batch, predictions))
        return loss

    def _score_rows(self, batch: Batch, predictions: Tensor) -> list[dict]:
        """One prediction record per row: its scores by label (and its targets, if any)."""
        labels = self.score_head.labels
        rows = []
        for b, sid in enumerate(batch.ids):
            row: dict = {
                "id": sid,
                "scores": dict(zip(labels, predictions[b].tolist(), strict=True)),
            }
            if self.score_head.config.problem == "single_label":
                row["prediction"] = labels[int(predictions[b].argmax())]
            if batch.targets is not None:
                row["targets"] = dict(zip(labels, batch.targets[b].tolist(), strict=True))
            rows.append(row)
        return rows

    def _log_scores(self, split: str) -> None:
        """Log `{split}/score/<metric>[/<label>]` (Spearman, MSE or accuracy) if any rank scored."""
        if self.score_head is None or split not in self.score_metrics:
            return
        metrics = self.score_metrics[split]
        seen = self.trainer.strategy.reduce(
            torch.tensor(float(metrics.seen), device=self.device), reduce_op="sum"
        )
        if float(seen) < 2:  # a rank correlation needs two samples
            metrics.reset()
            return
        results = metrics.compute()
        metrics.reset()
        self.log_dict(
            {f"{split}/score/{k}": v for k, v in results.items()}, add_dataloader_idx=False
        )

    def generation_stream(
        self,
        batch: Batch,
        max_new_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        use_cache: bool = True,
        batch_invariant: bool = True,
    ) -> Iterator[Step]:
        """Decoding steps for a left-padded prompt batch (`lmm.generation.decode.stream_tokens`).

        The media of the whole batch are encoded in one forward and the prompts prefilled
        together, with kernels that make each row's answer independent of the batch. With
        `seed`, row `i` samples from a generator seeded by (seed, sample id): the same answer at
        any batch size and in any order.
        """
        with kernels(batch_invariant):
            embeds = self.embed(batch)  # [B, L, D]
        stops = self._stop_strings()
        seeds = None
        if seed is not None:
            seeds = [zlib.crc32(f"{seed}:{sid}".encode()) for sid in batch.ids]

        def hit_stop_string(row: int, tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-16:], skip_special_tokens=False)
            return any(s and s in tail for s in stops)

        return stream_tokens(
            self.llm,
            embeds,
            batch.attention_mask,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            stop_token_ids=self._stop_token_ids(stops),
            stop=hit_stop_string if stops else None,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
            use_cache=use_cache,
            batch_invariant=batch_invariant,
        )

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int | None = None, **sampling) -> list[str]:
        """Answers for a prompt batch: greedy unless `temperature` > 0 (see `generation_stream`)."""
        answers: list[list[int]] = [[] for _ in range(len(batch))]
        for step in self.generation_stream(batch, max_new_tokens, **sampling):
            for row, token in zip(step.rows, step.tokens, strict=True):
                if token is not None:
                    answers[row].append(token)
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=False)
        stops = self._stop_strings()
        return [cut_at_stop(t, stops) for t in texts]

    def _stop_strings(self) -> list[str]:
        if self.stop_strings is not None:
            return list(self.stop_strings)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        template = getattr(datamodule, "template", None) or getattr(self, "template", None)
        return list(getattr(template, "stop_strings", ()))

    def _stop_token_ids(self, stops: list[str]) -> list[int]:
        """eos plus every stop string that is a single token of the tokenizer."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        vocab = self.tokenizer.get_vocab()
        return ids + [vocab[s] for s in stops if s in vocab]

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self._loader_task("test", dataloader_idx)
        if task is not None:
            self._score_task(task, batch, "test")
            return
        if self.score_head is not None:
            self._score_step(batch, "test")
            return
        predictions = self.generate(batch)
        refs = [r or "" for r in batch.references]
        self.test_accuracy.update(predictions, refs)
        for pred, ref, meta, sid in zip(predictions, refs, batch.meta, batch.ids, strict=True):
            task_name = meta.get("task")
            if task_name is not None:
                if task_name not in self.task_accuracy:
                    self.task_accuracy[task_name] = ExactMatch().to(self.device)
                self.task_accuracy[task_name].update([pred], [ref])
            correct = normalize_answer(pred) == normalize_answer(ref)
            self.predictions.append(
                {
                    "id": sid,
                    "task": task_name,
                    "prediction": pred,
                    "reference": ref,
                    "correct": correct,
                }
            )
        self.log(
            "test/accuracy", self.test_accuracy, batch_size=len(batch), add_dataloader_idx=False
        )

    def on_test_epoch_start(self) -> None:
        self.predictions = []
        self.task_results: dict[str, dict[str, float]] = {}
        self.task_predictions: dict[str, list[dict]] = {}

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")
        for task, metric in self.task_accuracy.items():
            self.log(f"test/accuracy/{task}", metric.compute())
            metric.reset()
        if self._log_tasks("test"):
            tasks = [t for t in self._tasks("test") if t is not None]
            write_results(self.trainer, tasks, self.task_results, self.task_predictions)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        """Generated answers (`prediction`), or with a score head the scores by label."""
        if self.score_head is not None:
            return self._score_rows(batch, self.score_head.predictions(self.scores(batch)))
        answers = self.generate(batch)
        return [{"id": i, "prediction": a} for i, a in zip(batch.ids, answers, strict=True)]

    # --- benchmark tasks as dataloaders (lmm.evaluation.runner.Task) --------------------------
    def _tasks(self, split: str) -> list:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        loader_tasks = getattr(datamodule, "loader_tasks", None)
        return list(loader_tasks(split)) if loader_tasks is not None else []

    def _loader_task(self, split: str, dataloader_idx: int):
        tasks = self._tasks(split)
        return tasks[dataloader_idx] if dataloader_idx < len(tasks) else None

    def _score_task(self, task, batch: Batch, split: str) -> None:
        answers = self.generate(batch, max_new_tokens=task.max_new_tokens)
        datamodule = self.trainer.datamodule
        rows = task.update(answers, batch, template=getattr(datamodule, "template", None))
        if split == "test":
            self.task_predictions.setdefault(task.name, []).extend(rows)

    def _log_tasks(self, split: str) -> bool:
        """Log `{split}/{task}/{metric}` for every task scored this epoch; True if any was."""
        scored = False
        for task in self._tasks(split):
            if task is None:
                continue
            # Every rank must agree before `compute` (a collective): sum the samples seen.
            seen = self.trainer.strategy.reduce(
                torch.tensor(float(task.seen), device=self.device), reduce_op="sum"
            )
            if not float(seen):
                continue
            results = task.compute()
            task.reset()
            scored = True
            self.log_dict(
                {f"{split}/{task.name}/{k}": v for k, v in results.items()},
                add_dataloader_idx=False,
            )
            if split == "test":
                self.task_results[task.name] = results
        return scored

    def configure_optimizers(self):
        groups = param_groups(
            self.all_parts(), base_lr=_base_lr(self.optimizer_factory), part_lr=self.part_lr
        )
        if not groups:
            raise ValueError("nothing to train: every part is frozen")
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler_factory(optimizer, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _base_lr(factory) -> float:
    """The lr the optimizer factory was configured with (its default if none)."""
    keywords: Mapping = getattr(factory, "keywords", None) or {}
    if "lr" in keywords:
        return float(keywords["lr"])
    probe = factory([torch.nn.Parameter(torch.zeros(1))])
    return float(probe.defaults["lr"])
