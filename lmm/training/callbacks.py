"""Callbacks every `LMMModule` brings along (`configure_callbacks`): the data connected to the
model, RNG state, skipped records, a stop on a non-finite loss, checkpoint hashes, and a
`last.ckpt` at the end of every fit (and on SIGTERM / Ctrl-C)."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmm.data.batch import Batch
from lmm.data.stream import NoUsableRecordsError
from lmm.training.checkpoint import add_hashes, verified, verify_hashes, verify_sharded
from lmm.utils.errors import UserError
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
    """Counts the bad records skipped with `on_bad_record: skip` and logs the step's
    `train/tokens_per_s`.

    A bad record is skipped again in every epoch that draws it, so two counts are kept and
    logged: `train/skipped_records`, distinct records skipped so far, and `train/skips`, every
    skip (a record skipped in two epochs counts 2). Each epoch's end warns with both while any
    were skipped, and the end of training names the first distinct records.
    """

    def __init__(self, show: int = 5):
        """
        Args:
            show: distinct skipped records named in the end-of-training warning.
        """
        self.show = show
        self.skips = 0
        self.distinct: dict[tuple[str, str], str] = {}  # (file, record id) -> problem
        self._epoch_skips = self._epoch_batches = self._epoch_trained = 0
        self._start = 0.0

    @property
    def skipped(self) -> int:
        """Distinct records skipped so far."""
        return len(self.distinct)

    def on_train_batch_start(self, trainer, module, batch: Batch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch: Batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and len(batch):
            module.log("train/tokens_per_s", batch.num_tokens / elapsed, batch_size=len(batch))
        records = getattr(batch, "skipped_records", None) or []
        self._epoch_batches += 1
        self._epoch_trained += bool(len(batch))
        if records:
            size = max(1, len(batch))
            self.skips += len(records)
            self._epoch_skips += len(records)
            for source, record_id, problem in records:
                self.distinct.setdefault((source, record_id), problem)
            module.log("train/skipped_records", float(self.skipped), batch_size=size)
            module.log("train/skips", float(self.skips), batch_size=size)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._epoch_skips = self._epoch_batches = self._epoch_trained = 0

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._epoch_batches and not self._epoch_trained:
            named = [f"  {f} [{i}]: {p}" for (f, i), p in list(self.distinct.items())[: self.show]]
            raise NoUsableRecordsError(
                f"epoch {trainer.current_epoch}: no sample of its {self._epoch_batches} batches "
                f"could be loaded ({self._epoch_skips} bad records skipped with on_bad_record: "
                "skip), so nothing was trained:\n" + "\n".join(named) + "\nFix: repair the "
                "records (`lmm data check` lists them) or point data.train at the right file"
            )
        if self._epoch_skips:
            log.warning(
                "epoch %d: %d bad training records skipped (on_bad_record: skip); %d distinct "
                "records so far, %d skips in all (a bad record is skipped in every epoch)",
                trainer.current_epoch,
                self._epoch_skips,
                self.skipped,
                self.skips,
            )

    def on_train_end(self, trainer, module) -> None:
        if self.distinct:
            named = [f"  {f} [{i}]: {p}" for (f, i), p in list(self.distinct.items())[: self.show]]
            if self.skipped > self.show:
                named.append(f"  ... and {self.skipped - self.show} more")
            log.warning(
                "training skipped %d distinct bad records (%d skips in all):\n%s\n"
                "`lmm data check` lists them all",
                self.skipped,
                self.skips,
                "\n".join(named),
            )

    def state_dict(self) -> dict:
        return {"skips": self.skips, "distinct": [[*k, v] for k, v in self.distinct.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.skips = int(state.get("skips", 0))
        self.distinct = {(f, i): p for f, i, p in state.get("distinct", [])}


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


class NonFiniteLossError(UserError, FloatingPointError):
    """A training loss that is NaN or infinite; the message names the batch's records."""


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
        raise NonFiniteLossError(
            f"training loss is {loss.detach().float().item()} at step {step} (batch "
            f"{self._batch_idx}): {where}. Fix: check those records' labels and scores (NaN, "
            "inf, out of range), or lower the learning rate / use bf16 or fp32 if the loss "
            "diverged; `lmm data check` validates the records"
        )


class StepProgress(L.Callback):
    """Shows `step N/max_steps` in the training progress bar when the run is bounded by
    `max_steps` (Lightning's own shows `Epoch 0/-2` then: max_epochs is -1 and the training
    stream has no length)."""

    def _describe(self, trainer) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or trainer.max_steps is None or trainer.max_steps < 0:
            return
        text = f"Epoch {trainer.current_epoch} · step {trainer.global_step}/{trainer.max_steps}"
        progress, task = getattr(bar, "progress", None), getattr(bar, "train_progress_bar_id", None)
        if progress is not None and task is not None:  # RichProgressBar
            progress.update(task, description=text)
        elif getattr(bar, "_train_progress_bar", None) is not None:  # TQDMProgressBar
            bar._train_progress_bar.set_description(text)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._describe(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self._describe(trainer)


class LastCheckpoint(Checkpoint):
    """Writes `last.ckpt` when a fit ends, whatever the checkpoint schedule, and when SIGTERM
    or Ctrl-C stops it.

    Lightning's `ModelCheckpoint` saves after validation or every n steps, and `save_last`
    copies only those saves: a 30-step run validated every 500 steps leaves no checkpoint, a
    2500-step run saved every 1000 leaves step 2000. This callback writes `last.ckpt` to the
    first `ModelCheckpoint`'s folder (`<log dir>/checkpoints/`) after the last step, unless a
    `ModelCheckpoint` wrote it at that step. It is a `Checkpoint`, so Lightning runs it after
    the `ModelCheckpoint`s.

    SIGTERM (a scheduler's pre-emption, `kill`) and the first Ctrl-C end training after the
    current step, where `ModelCheckpoint(every_n_train_steps=...)` saves (an exact resume
    point), and `last.ckpt` is written there; a second Ctrl-C stops at once without saving (the
    step may be half done). The process then exits as Lightning's do (Ctrl-C: 1, SIGTERM:
    `lmm` exits 143). With several ranks the stop is agreed, so every rank saves the same step.
    Nothing is written without a `ModelCheckpoint` (`trainer.enable_checkpointing: false`) or
    when no step was trained; the write goes through the strategy's checkpoint IO (atomic:
    `AtomicCheckpointIO`, the `lmm` command's default).
    """

    def __init__(self):
        self._start_step = 0  # the global step training (re)started from
        self._saved_step = -1  # the global step of the last checkpoint written by anyone
        self._written_step = -1  # the global step of the last `last.ckpt` written here
        self._stop: str | None = None  # "Ctrl-C" once pressed
        self._at_step_end = False  # the stop was raised here, after a whole step
        self._previous_sigint = None

    @staticmethod
    def model_checkpoint(trainer) -> ModelCheckpoint | None:
        """The trainer's first `ModelCheckpoint` (its folder holds `last.ckpt`), if any."""
        found = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        return found[0] if found else None

    def path(self, trainer) -> Path | None:
        """Where `last.ckpt` goes: the `ModelCheckpoint`'s last file (it may be versioned,
        `last-v1.ckpt`), else `last.ckpt` in its folder; None without a `ModelCheckpoint`."""
        checkpoint = self.model_checkpoint(trainer)
        if checkpoint is None or checkpoint.dirpath is None:
            return None
        if checkpoint.last_model_path:
            return Path(checkpoint.last_model_path)
        step = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        return Path(checkpoint.format_checkpoint_name(step, checkpoint.CHECKPOINT_NAME_LAST))

    # --- Ctrl-C: stop after the step ---------------------------------------------------------
    def on_train_start(self, trainer, module) -> None:
        self._start_step = trainer.global_step
        self._stop, self._at_step_end = None, False
        # Only where Python delivers signals, and only over Python's own handler (a debugger's
        # or a notebook's stays theirs).
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._stop is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: now
        self._stop = "Ctrl-C"
        log.warning(
            "Ctrl-C: training stops after this step and saves last.ckpt "
            "(Ctrl-C again stops at once, without saving)"
        )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        sigterm = trainer.received_sigterm
        stop = self._stop is not None or sigterm
        if trainer.world_size > 1:  # every rank stops at the same step, or none does
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self._at_step_end = True
        if sigterm:
            raise SIGTERMException()
        raise KeyboardInterrupt

    # --- the saves ---------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def _written_now(self, trainer) -> bool:
        """Whether `last.ckpt` already holds this step (written here, or by a `ModelCheckpoint`
        with `save_last`, which writes it with each of its saves)."""
        step = trainer.global_step
        if self._written_step == step:
            return True
        checkpoint = self.model_checkpoint(trainer)
        return (
            self._saved_step == step
            and checkpoint is not None
            and bool(checkpoint.save_last)
            and bool(checkpoint.last_model_path)
        )

    def _save(self, trainer) -> Path | None:
        path = self.path(trainer)
        if path is None or trainer.global_step <= self._start_step or self._written_now(trainer):
            return None
        trainer.save_checkpoint(path, weights_only=False)  # a full, resumable checkpoint
        self._written_step = trainer.global_step
        return path

    def on_train_end(self, trainer, module) -> None:
        self._restore_sigint()
        path = self._save(trainer)
        if path is not None:
            log.info("saved %s (step %d)", path, trainer.global_step)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self._restore_sigint()
        sigterm = isinstance(exception, SIGTERMException)
        if not (sigterm or isinstance(exception, KeyboardInterrupt)):
            return  # an error: the weights may be what caused it
        what = "SIGTERM" if sigterm else "Ctrl-C"
        if not (sigterm or self._at_step_end):
            log.warning(
                "%s stopped training in the middle of step %d: last.ckpt not written (the "
                "step was half done); the newest checkpoint is the last one saved before",
                what,
                trainer.global_step + 1,
            )
            return
        path = self._save(trainer)
        if path is not None:
            log.warning(
                "%s: training stopped after step %d, saved %s; resume with --ckpt_path %s",
                what,
                trainer.global_step,
                path,
                path,
            )
