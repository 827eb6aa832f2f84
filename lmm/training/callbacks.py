"""Callbacks every `LMMModule` brings along (`configure_callbacks`): the data connected to the
model, RNG state, skipped records."""

from __future__ import annotations

import random
import time

import lightning as L
import numpy as np
import torch

from lmm.data.batch import Batch
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
