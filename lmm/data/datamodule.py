"""ChatDataModule: interleaved image-text chat data (Mantis / LLaVA json) for Lightning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lmm.data.batch import Batch, Features
from lmm.data.collate import PadCollator
from lmm.data.formats import VideoOptions, iter_samples, load_samples, read_records, stream_records
from lmm.data.mixture import Mixture
from lmm.data.policy import Preprocessing
from lmm.data.processor import MediaSpec, Processor
from lmm.data.sample import IMAGE_MARKER, BadRecordError, Sample
from lmm.data.stream import (
    NoUsableRecordsError,
    StreamLoader,
    TrainStream,
    check_pack_tokens,
    shuffled,
)
from lmm.data.templates import ChatTemplate
from lmm.utils.logging import get_logger

log = get_logger(__name__)


class PromptTask:
    """A named set of prompts to answer and score (a benchmark); see `lmm.evaluation.runner.Task`.

    The data module turns a task into a generation dataloader (left-padded prompts); the model
    scores the answers with the task. A sample's `meta["assistant_prefix"]`, if any, is text
    the answer starts with, appended after the assistant header (MVBench's "Best option:(").
    """

    name: str = "task"
    max_new_tokens: int | None = None

    def samples(self) -> list[Sample]:
        """The task's prompts, in a fixed order."""
        raise NotImplementedError


class ChatDataset(Dataset):
    """Samples processed on access (in the loader workers): images are read lazily."""

    def __init__(self, samples: Sequence[Sample], encode: Callable[[Sample], Features]):
        self.samples = samples
        self.encode = encode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Features:
        return self.encode(self.samples[index])


class ChatDataModule(L.LightningDataModule):
    """Chat data from json/jsonl files in the Mantis or LLaVA format.

    fit/validate use teacher forcing (loss); test/predict give prompts for generation, with the
    last assistant turn as the reference. The tokenizer and media spec come from the model
    (`connect`); an `LMMModule`'s trainer connects them at setup if you have not.
    """

    def __init__(
        self,
        template: ChatTemplate,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        root: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int = 2048,
        seed: int = 0,
        allow_outside_root: bool = False,
        pack_tokens: int | None = None,
        buffer_size: int = 1024,
        streaming: bool = False,
        on_bad_record: Literal["raise", "skip"] = "raise",
        group_by_modality_length: bool = False,
        max_frames: int = 8,
        fps: float | None = None,
        labels: list[str] | None = None,
        val_tasks: list[PromptTask] | None = None,
        test_tasks: list[PromptTask] | None = None,
        preprocessing: Preprocessing | None = None,
    ):
        """
        Args:
            template: chat template that renders turns and decides what is trained.
            train: training data: a json/jsonl file, or a mixture YAML (docs/mixtures.md).
            val: validation data file.
            test: test data file (generation, scored against the last assistant turn).
            predict: prediction data file (generation; default: the test file).
            root: folder media paths are relative to (default: each data file's folder).
            batch_size: training batch size per device.
            eval_batch_size: batch size for val/test/predict (default: batch_size).
            num_workers: DataLoader worker processes.
            max_length: longest sample in tokens; longer ones lose whole rounds from the end.
            seed: seed of the training shuffle.
            allow_outside_root: accept absolute media paths and paths with `..`.
            pack_tokens: pack training samples into rows of this many tokens (None: pad); at
                least `max_length`, so that every sample fits a row.
            buffer_size: training samples shuffled and packed together.
            streaming: read the training file with `datasets` streaming instead of into memory.
            on_bad_record: `raise` at the first bad record, or `skip` and count it: in the
                training stream as it goes, in val/test/predict files once, when their loader
                is built (each record read and processed, images decoded).
            group_by_modality_length: without packing, batch image and text-only samples
                apart, each batch of similar length (LLaVA's sampler).
            max_frames: frames sampled from each video (spread uniformly unless `fps`).
            fps: sample videos at this many frames per second (Mantis), at most `max_frames`.
            labels: the score names of scored (classification) records, in target order.
            val_tasks: benchmark tasks answered and scored at every validation, logged as
                `val/<task>/<metric>` (e.g. `lmm.evaluation.runner.Task`).
            test_tasks: benchmark tasks answered and scored by `lmm test` (`test/<task>/<metric>`,
                plus predictions JSONL and results JSON in the log folder).
            preprocessing: marker placement, truncation and tokenization policies
                (lmm.data.policy.Preprocessing); the seed recipes set their seed's, the default
                is lmm's.
        """
        super().__init__()
        check_pack_tokens(pack_tokens, max_length)  # once, before any data is read
        self.template = template
        self.files = {"train": train, "val": val, "test": test, "predict": predict}
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.seed = seed
        self.allow_outside_root = allow_outside_root
        self.pack_tokens = pack_tokens
        self.buffer_size = buffer_size
        self.streaming = streaming
        self.on_bad_record = on_bad_record
        self.group_by_modality_length = group_by_modality_length
        self.video = VideoOptions(max_frames=max_frames, fps=fps)
        self.labels = labels
        self.preprocessing = preprocessing or Preprocessing()
        self.tasks: dict[str, list[PromptTask]] = {
            "val": list(val_tasks or []),
            "test": list(test_tasks or []),
        }
        _check_task_names(self.tasks)
        self.position = (0, 0)  # (epoch, batches of it consumed): the training loader's state
        self.processor: Processor | None = None
        self.samples: dict[str, list[Sample]] = {}
        self._processed: set[str] = set()  # eval splits whose bad samples were dropped (skip)
        self._read_skips: dict[str, list[BadRecordError]] = {}  # the reader's, per eval split

    def connect(
        self, tokenizer: PreTrainedTokenizerBase, media: MediaSpec, image_token: str = IMAGE_MARKER
    ) -> None:
        """Bind the model's tokenizer and media spec (token counts, image transform)."""
        self.processor = Processor(
            tokenizer, self.template, media, self.max_length, image_token, self.preprocessing
        )

    def setup(self, stage: str | None = None) -> None:
        splits = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }
        if stage == "predict":
            splits["predict"] = (self.predict_split(),)
        for split in splits.get(stage, tuple(self.files)) if stage else tuple(self.files):
            if self.files[split] and split not in self.samples and split != "train":
                self.samples[split] = self.load(split)

    def _read_options(self) -> dict:
        return dict(
            root=self.root,
            allow_outside_root=self.allow_outside_root,
            video=self.video,
            labels=self.labels,
            policy=self.preprocessing,
        )

    def load(self, split: str) -> list[Sample]:
        path = self.files[split]
        if path is None:
            raise ValueError(f"no {split} data file given (data.{split} in the recipe)")
        if self.on_bad_record == "raise":
            samples = load_samples(path, **self._read_options())
        else:
            samples, bad = [], []
            for item in iter_samples(read_records(path), source=path, **self._read_options()):
                (bad if isinstance(item, BadRecordError) else samples).append(item)
            if not samples:
                self._report_skips(split, path, bad, 0)
            self._read_skips[split] = bad  # reported with the processor's, once (`_usable`)
        log.info("%s: %d samples from %s", split, len(samples), Path(path))
        return samples

    def _usable(self, split: str, encode: Callable[[Sample], Features]) -> None:
        """With `skip`: drop the samples of an eval split that the processor rejects (a broken
        or oversized image, a sample too long for max_length), counting them; once per split."""
        if self.on_bad_record == "raise" or split in self._processed:
            return
        good, bad = [], list(self._read_skips.pop(split, []))
        for sample in self.samples[split]:
            try:
                encode(sample)
                good.append(sample)
            except BadRecordError as err:
                bad.append(err)
        self._report_skips(split, self.files[split], bad, len(good))
        self.samples[split] = good
        self._processed.add(split)

    def _report_skips(self, split: str, path, bad: list[BadRecordError], n_good: int) -> None:
        """Warn with the count and the first records skipped; no usable record is an error."""
        if not bad:
            return
        named = "\n".join(f"  {err}" for err in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        if not n_good:
            raise NoUsableRecordsError(
                f"data.{split} ({path}): every one of its {len(bad)} records is bad "
                f"(on_bad_record: skip skipped them all):\n{named}{more}\n"
                "Fix: repair the records (`lmm data check` lists them) or point "
                f"data.{split} at the right file"
            )
        log.warning(
            "data.%s (%s): %d bad records skipped (on_bad_record: skip), %d kept:\n%s%s",
            split,
            path,
            len(bad),
            n_good,
            named,
            more,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.samples:
            self.samples[split] = self.load(split)
        assert self.processor is not None, "call connect() or let the trainer call setup()"
        generate = split in ("test", "predict")
        encode = self.processor.prompt if generate else self.processor
        self._usable(split, encode)
        pad_id = self.processor.tokenizer.pad_token_id
        return DataLoader(
            ChatDataset(self.samples[split], encode),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=PadCollator(pad_id, "left" if generate else "right"),
        )

    def train_stream(self) -> TrainStream:
        """The resumable training stream, positioned where the last checkpoint left it."""
        path = self.files["train"]
        if path is None:
            raise ValueError("no train data file given (data.train in the recipe)")
        assert self.processor is not None, "call connect() or let the trainer call setup()"
        kwargs = dict(source=path, **self._read_options())
        if Path(path).suffix in (".yaml", ".yml"):
            mixture = Mixture.from_yaml(path, "train", seed=self.seed)
            log.info("train mixture %s: %d samples per epoch", path, len(mixture))
            source = partial(
                mixture.samples,
                root=self.root,
                allow_outside_root=self.allow_outside_root,
                policy=self.preprocessing,
            )
        elif self.streaming:

            def source(epoch: int):
                return iter_samples(stream_records(path), **kwargs)

        else:
            if "train" not in self.samples:
                self.samples["train"] = list(iter_samples(read_records(path), **kwargs))
                log.info("train: %d records from %s", len(self.samples["train"]), path)
            source = shuffled(self.samples["train"], self.seed)
        stream = TrainStream(
            source,
            self.processor,
            batch_size=self.batch_size,
            pack_tokens=self.pack_tokens,
            buffer_size=self.buffer_size,
            seed=self.seed,
            on_bad_record=self.on_bad_record,
            group_by_modality_length=self.group_by_modality_length,
        )
        stream.epoch, stream.start = self.position
        if self.trainer is not None:
            stream.rank, stream.world_size = self.trainer.global_rank, self.trainer.world_size
        return stream

    def train_dataloader(self) -> DataLoader:
        return StreamLoader(self.train_stream(), num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if self.trainer is not None and self.trainer.training and batch.stream_position:
            epoch, index = batch.stream_position
            self.position = (epoch, index + 1)
        return batch

    def state_dict(self) -> dict:
        """The training loader's position; with the data and seed it fixes every later batch."""
        return {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state: dict) -> None:
        self.position = (int(state["epoch"]), int(state["batches"]))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.files["val"] and not self.tasks["val"]:
            return []  # no validation: Lightning skips the loop
        return self._eval_loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders("test")

    def loader_tasks(self, split: str) -> list[PromptTask | None]:
        """What each `{split}_dataloader` loader holds: None for the data file, else its task."""
        head: list[PromptTask | None] = [None] if self.files.get(split) else []
        return head + list(self.tasks.get(split, []))

    def _eval_loaders(self, split: str) -> DataLoader | list[DataLoader]:
        """The split's data file loader, followed by one loader per task (if there are tasks)."""
        if not self.tasks[split]:
            return self._loader(split, train=False)
        loaders = [self._loader(split, train=False)] if self.files[split] else []
        return loaders + [self.task_loader(task) for task in self.tasks[split]]

    def task_loader(self, task: PromptTask) -> DataLoader:
        """A generation dataloader of a task's prompts (left-padded, in order)."""
        assert self.processor is not None, "call connect() or let the trainer call setup()"
        samples = task.samples()
        log.info("task %s: %d prompts", task.name, len(samples))
        return DataLoader(
            ChatDataset(samples, self.task_prompt),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=PadCollator(
                self.processor.tokenizer.pad_token_id, "left", task.name, task.max_new_tokens
            ),
        )

    def task_prompt(self, sample: Sample) -> Features:
        """Generation features of a task sample, ending with its `assistant_prefix` if any."""
        assert self.processor is not None, "call connect() or let the trainer call setup()"
        features = self.processor.prompt(sample)
        prefix = sample.meta.get("assistant_prefix")
        if prefix:
            ids = self.processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            extra = torch.tensor(ids, dtype=torch.long)
            features.input_ids = torch.cat([features.input_ids, extra])
            features.labels = torch.cat([features.labels, torch.full_like(extra, -100)])
        return features

    def predict_split(self) -> str:
        """The split `lmm predict` answers: `predict`, else the recipe's `test` file."""
        if self.files["predict"]:
            return "predict"
        if self.files["test"]:
            return "test"
        raise ValueError(
            "lmm predict: no data to answer: the recipe has neither data.init_args.predict nor "
            "data.init_args.test. Fix: add --data.init_args.predict=FILE (a json/jsonl chat file)"
        )

    def predict_dataloader(self) -> DataLoader:
        """Prompts of the `predict` file, or of the `test` file when there is none."""
        split = self.predict_split()
        if split != "predict":
            log.info("predict: no data.predict given; answering data.test (%s)", self.files[split])
        return self._loader(split, train=False)


def _check_task_names(tasks: dict[str, list[PromptTask]]) -> None:
    """Task names key the logged metrics and output files: they must be unique per split."""
    for split, items in tasks.items():
        names = [t.name for t in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"data.{split}_tasks: task names {dupes} appear more than once; "
                "give each task its own `name`"
            )
