"""Callbacks every `LMMModule` brings along (`configure_callbacks`): the data connected to the
model, RNG state, skipped records, a stop on a non-finite loss, checkpoint hashes."""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lmm.data.batch import Batch
from lmm.training.checkpoint import add_hashes, verified, verify_hashes, verify_sharded
from lmm.utils.logging import get_logger

log = get_logger(__name__)


class ConnectData(L.Callback):
    """Gives the trainer's datamodule the model's tokenizer, media spec and image token, once.

    Neither asks the other: the datamodule processes samples with what it is given
    (`ChatDataModule.connect`), the module trains on the batches; the trainer joins them at
    `setup`, after the datamodule's own setup and before any dataloader is built.
    """

    def setup(self, trainer, module, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "processor", True) is None:
            datamodule.connect(module.tokenizer, module.media_spec(), module.image_token)


class RngState(L.Callback):
    """Saves and restores torch's, numpy's and Python's RNG states with each checkpoint.

    Lightning does not save them; an exact resume needs them (dropout, sampling). Stored as
    plain types and tensors under `lmm_rng`: loadable with `weights_only=True`.
    """

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["lmm_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        rng = checkpoint.get("lmm_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])


class SkippedRecords(L.Callback):
    """Logs `train/skipped_records` (bad records skipped with `on_bad_record: skip`) and the
    step's `train/tokens_per_s`; warns at each epoch end while any were skipped."""

    def __init__(self):
        self.skipped = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch: Batch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch: Batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            module.log("train/tokens_per_s", batch.num_tokens / elapsed, batch_size=len(batch))
        if batch.skipped:
            self.skipped += batch.skipped
            module.log("train/skipped_records", float(self.skipped), batch_size=len(batch))

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.skipped:
            log.warning(
                "epoch %d: %d bad training records skipped so far (on_bad_record: skip)",
                trainer.current_epoch,
                self.skipped,
            )


class CheckpointHashes(L.Callback):
    """Writes the hash of every tensor and value into each checkpoint (`lmm_hashes`) and checks
    them when Lightning loads one (`--ckpt_path` a file, `last`, `best` or a URL: by then
    `trainer.ckpt_path` is the resolved file), unless `load_checkpoint_file` already checked
    that file. Last in the callback list, so the entries other callbacks add (RNG state) are
    covered.

    A sharded (FSDP2) checkpoint folder is checked against its manifest (`verify_sharded`;
    `FSDP2Strategy` writes it and checks it before loading, so here it is not read again)."""

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        add_hashes(checkpoint)

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        path = trainer.ckpt_path if trainer is not None else None
        if path is not None and Path(path).is_dir():
            # The tensors reached the model shard by shard, not through this dict (which holds
            # the rest, meta.pt): the manifest covers every file of the folder.
            verify_sharded(path, trainer.strategy)
            return
        if path is None or not verified(path):
            verify_hashes(checkpoint, path or "<loaded by Lightning>")


class NonFiniteLoss(L.Callback):
    """Stops training when a batch's loss is NaN or infinite, naming the batch's record ids,
    before its backward pass and optimizer step (the weights stay as they were).

    On by default (`LMMModule.configure_callbacks`); a recipe's
    `trainer.callbacks: [{class_path: lmm.training.callbacks.NonFiniteLoss, init_args:
    {enabled: false}}]` is used instead of the default one (`unless_configured`). With several ranks the decision is shared,
    so every rank stops together.
    """

    def __init__(self, enabled: bool = True):
        """
        Args:
            enabled: raise on a non-finite training loss (False: train on, as Lightning does).
        """
        self.enabled = enabled
        self._batch: Batch | None = None
        self._batch_idx = -1

    @classmethod
    def unless_configured(cls, trainer) -> NonFiniteLoss:
        """The trainer's own `NonFiniteLoss` (from a recipe's `trainer.callbacks`), else the
        default: Lightning lets a module's callbacks replace the trainer's of the same type."""
        for callback in getattr(trainer, "callbacks", None) or []:
            if isinstance(callback, cls):
                return callback
        return cls()

    def on_train_batch_start(self, trainer, module, batch: Batch, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer is not None and trainer.world_size > 1:
            anywhere = trainer.strategy.reduce_boolean_decision(bad, all=False)
        else:
            anywhere = bad
        if not anywhere:
            return
        ids = list(getattr(self._batch, "ids", []) or [])
        step = trainer.global_step if trainer is not None else "?"
        where = (
            f"records {ids}"
            if bad
            else f"another rank's batch (this rank's records {ids} are finite)"
        )
        raise FloatingPointError(
            f"training loss is {loss.detach().float().item()} at step {step} (batch "
            f"{self._batch_idx}): {where}. Fix: check those records' labels and scores (NaN, "
            "inf, out of range), or lower the learning rate / use bf16 or fp32 if the loss "
            "diverged; `lmm data check` validates the records"
        )
