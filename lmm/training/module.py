"""LMMModule: trains a family model for an objective (one Lightning module for every family)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from lmm.components.pretrained import builds_published, reads_weights
from lmm.data.batch import Batch
from lmm.data.processor import MediaSpec
from lmm.data.tokenization import add_special_tokens, load_tokenizer
from lmm.families.model import FamilyModel
from lmm.generation.decode import Step
from lmm.generation.generator import Generator
from lmm.training.callbacks import (
    CheckpointHashes,
    ConnectData,
    LastCheckpoint,
    NonFiniteLoss,
    RngState,
    SkippedRecords,
    StepProgress,
)
from lmm.training.checkpoint import init_from_checkpoint
from lmm.training.lora import LoraConfig, apply_lora
from lmm.training.objectives import LanguageModel, Objective
from lmm.training.optim import WarmupCosine, param_groups
from lmm.training.strategies import FSDP2Config, shard_module
from lmm.utils.errors import UserError


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint whose weights do not fit the recipe's model."""


def check_state_fits(module: nn.Module, state: Mapping, saved: Mapping | None = None) -> None:
    """`CheckpointMismatchError` when `state` (a checkpoint's state dict) does not have exactly
    the module's weight names and shapes; the message names the family the checkpoint came
    from (`saved`, its `lmm_model` entry) and at most three names of each kind."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return
    saved = saved or {}
    came = "a model whose family it does not record"
    if saved.get("family"):
        came = f"a {saved['family']} model ({saved['class']}, objective {saved.get('objective')})"
    ours = getattr(module, "family", lambda: type(module).__name__)()
    objective = getattr(module, "objective", None)
    if objective is not None:
        ours += f" model (objective {type(objective).__name__})"
    lines = [
        f"the checkpoint holds {came}; the recipe builds a {ours}, and the weights "
        f"differ: {len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of "
        "another shape"
    ]
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            lines.append(f"  {label}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else ""))
    for k in shapes[:3]:
        lines.append(
            f"  {k}: {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
        )
    lines.append(
        "Fix: pass the recipe the checkpoint was trained with (`--config` of its run's "
        "config.yaml), or a checkpoint of this recipe"
    )
    raise CheckpointMismatchError("\n".join(lines))


class LMMModule(L.LightningModule):
    """Trains, validates, tests and predicts with any family model (`lmm.families`).

    The family model owns the architecture (its parts, media spec, FSDP2 plan, FLOPs, prefill);
    the objective owns the loss and what eval steps give (`LanguageModel`, or `Scores` for a
    score head). Benchmark scoring and result files (`lmm.evaluation.callbacks.Scoring`),
    prediction files (`PredictionWriter`), RNG state, skipped-record counts and the `last.ckpt`
    of every fit (`LastCheckpoint`) are callbacks this module brings along.
    """

    def __init__(
        self,
        model: FamilyModel | None = None,
        tokenizer: str | None = None,
        objective: Objective | None = None,
        image_token: str | None = None,
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
        init_from_transformers: str | None = None,
    ):
        """
        Args:
            model: the family model (e.g. `lmm.families.llava.LlavaModel`); unset with
                `init_from_transformers`.
            tokenizer: folder or hub id of the tokenizer; the image token, the family's special
                tokens and a pad token are added if missing (the LLM's embeddings grow); unset
                with `init_from_transformers`.
            objective: what to train for: `LanguageModel` (default, next-token loss, generated
                answers) or `Scores` (a score head, VideoScore).
            image_token: the placeholder token that media features replace (default: the
                family's, `<image>` for most).
            optimizer: optimizer class and its arguments (its `lr` is the base learning rate).
            scheduler: learning-rate schedule over the run's total steps (none = constant).
            part_lr: learning rate per part (`vision`, `connector`, `llm`, ...), overriding the base.
            freeze: parts whose parameters are not trained, or `re:<regex>` parameter names
                (default: the family's, e.g. all but VPG-C for Cheetah).
            max_new_tokens: generation length for test/predict (a benchmark may set its own).
            stop_strings: strings that end generation (default: the data template's, plus eos).
            fsdp: how FSDP2 shards the model under `ModelParallelStrategy`.
            init_from: a checkpoint of an earlier stage to start from (.ckpt, .safetensors or
                a sharded FSDP2 checkpoint folder).
            init_include: regexes of the weight names taken from `init_from` (default: all),
                e.g. `["model\\.connector\\..*"]` for stage 2 to take the stage-1 connector.
            lora: LoRA / DoRA / QLoRA adapters on the LLM (docs/lora.md); None trains weights.
            init_from_transformers: a transformers folder or hub id (LlavaForConditionalGeneration,
                LlavaOnevisionForConditionalGeneration, Idefics2ForConditionalGeneration,
                FuyuForCausalLM, Qwen2_5_VLForConditionalGeneration): the model, its weights,
                tokenizer and image settings come from it (imported once into a cache,
                docs/convert.md); `init_from` then loads on top of it.
        """
        super().__init__()
        transformers_weights = None
        if init_from_transformers is not None:
            if model is not None or tokenizer is not None:
                raise ValueError(
                    f"init_from_transformers ({init_from_transformers}) builds the model and the "
                    "tokenizer from that folder; the recipe also sets model.init_args."
                    f"{'model' if model is not None else 'tokenizer'}. Fix: remove it (or "
                    "init_from_transformers)"
                )
            from lmm.families.hf import build_from_transformers

            model, tokenizer, transformers_weights = build_from_transformers(init_from_transformers)
        elif model is None or tokenizer is None:
            raise ValueError(
                f"LMMModule needs model.init_args.{'model' if model is None else 'tokenizer'}. "
                "Fix: set model and tokenizer, or init_from_transformers (a transformers folder)"
            )
        self.model = model
        self.image_token = image_token or model.default_image_token
        self.tokenizer = load_tokenizer(
            tokenizer, self.image_token, published_stub=builds_published()
        )
        add_special_tokens(self.tokenizer, model.special_tokens())
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        model.llm.resize_vocab(len(self.tokenizer))
        self.objective = objective or LanguageModel()
        self.objective.bind(self)
        self.generator = Generator(
            model, self.tokenizer, self.image_token_id, max_new_tokens, stop_strings
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.part_lr = dict(part_lr or {})
        self.freeze_parts = list(model.default_frozen() if freeze is None else freeze)
        self.fsdp = fsdp or FSDP2Config()
        self.lora = lora
        self.predictions: list[dict] = []
        self._sharded = False
        if transformers_weights and reads_weights():  # what is not in transformers folders
            init_from_checkpoint(self, transformers_weights, [".*"])
        if init_from and reads_weights():  # (meta: rank 0's values come after sharding)
            init_from_checkpoint(self, init_from, list(init_include or [".*"]))
        self.apply_freeze()
        if lora is not None:
            apply_lora(self, lora)
        self.train()  # from_pretrained leaves modules in eval mode

    def parts(self) -> dict[str, nn.Module]:
        """The family model's parts (what LoRA adapts)."""
        return self.model.parts()

    def all_parts(self) -> dict[str, nn.Module]:
        """The model's parts plus the objective's (a score head): freeze, part_lr, optimizer."""
        return {**self.parts(), **self.objective.parts()}

    def media_spec(self) -> MediaSpec:
        return self.model.media_spec()

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

    def configure_callbacks(self) -> list[L.Callback]:
        # evaluation builds on training
        from lmm.evaluation.callbacks import PredictionWriter, Scoring

        return [
            ConnectData(),
            RngState(),
            SkippedRecords(),
            NonFiniteLoss.unless_configured(self._trainer),
            Scoring(),
            StepProgress(),
            PredictionWriter.unless_configured(self._trainer),
            CheckpointHashes(),
            LastCheckpoint(),  # a Checkpoint: Lightning runs it after the ModelCheckpoints
        ]

    # --- checkpoints ----------------------------------------------------------------------
    def family(self) -> str:
        """The family of this module's model (`lmm.families.<family>...`), for messages."""
        where = type(self.model).__module__.split(".")
        return where[2] if where[:2] == ["lmm", "families"] else type(self.model).__qualname__

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        model = type(self.model)
        checkpoint["lmm_model"] = {
            "family": self.family(),
            "class": f"{model.__module__}.{model.__qualname__}",
            "objective": type(self.objective).__name__,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint whose weights do not fit this recipe's model, naming the family
        it came from and the first names that differ (before Lightning's strict load lists them
        all)."""
        state = checkpoint.get("state_dict")
        if state is not None:
            check_state_fits(self, state, checkpoint.get("lmm_model", {}))

    # --- forward and loss -----------------------------------------------------------------
    def forward(self, batch: Batch, **kwargs) -> Tensor:
        """Logits `[B, L, V]` of a batch, through the family model's own forward (the FSDP2
        root); `return_hidden=True` for the last hidden states, `logits_at` for some positions."""
        return self.model(batch, self.image_token_id, self.model.attention_mask(batch), **kwargs)

    def loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The objective's mean loss over the global batch, and the count it is a mean over.

        With several ranks each rank's sum is divided by the global count (times the world
        size, which data-parallel gradient averaging divides out again), so the gradients equal
        those of one process on the whole global batch, whatever the split between ranks.
        """
        loss_sum, n = self.objective.loss(self, batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_initialized():
            n_global = n.detach().clone()
            torch.distributed.all_reduce(n_global)
            return loss_sum * world / n_global.clamp(min=1), n_global
        return loss_sum / n.clamp(min=1), n

    def configure_model(self) -> None:
        """Under ModelParallelStrategy, shard with the family's FSDP2 plan (`shard_module`)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharding = isinstance(strategy, ModelParallelStrategy)
        if not self._sharded:
            shard_module(self, strategy if sharding else None, self.fsdp)
            self._sharded = sharding

    # --- steps ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        """The objective's loss; None (no backward, no optimizer step) for an empty batch,
        whose every sample was a bad record skipped on every rank (`TrainStream`)."""
        if len(batch) == 0:
            # Lightning would warn after every such step that a None may be a mistake; here it
            # is meant (the stream logged the skipped records)
            warnings.filterwarnings("ignore", message="`training_step` returned `None`")
            return None
        loss, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0):
        """The objective's loss; a benchmark's batch is answered (the `Scoring` callback scores)."""
        if batch.task is not None:
            return self.objective.test_step(self, batch)
        return self.objective.validation_step(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.objective.epoch_end(self, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Prediction records (answers or scores); the `Scoring` callback scores them."""
        rows = self.objective.test_step(self, batch)
        if batch.task is None:
            self.predictions.extend(rows)
        return rows

    def on_test_epoch_start(self) -> None:
        self.predictions = []

    def on_test_epoch_end(self) -> None:
        self.objective.epoch_end(self, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        """Generated answers (`prediction`), or with a score head the scores by label."""
        return self.objective.predict_step(self, batch)

    # --- generation -----------------------------------------------------------------------
    def generation_stream(self, batch: Batch, *args, **kwargs) -> Iterator[Step]:
        """Decoding steps for a left-padded prompt batch (`Generator.stream`)."""
        return self.generator.stream(batch, *args, **kwargs)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int | None = None, **sampling) -> list[str]:
        """Answers for a prompt batch: greedy unless `temperature` > 0 (`Generator.generate`)."""
        return self.generator.generate(batch, max_new_tokens, **sampling)

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
