"""A resumable training stream: records → samples → packed or padded batches, exactly replayable.

The stream of one epoch is a pure function of (data, seed, epoch): records are read in
file order (from memory, or streamed with `datasets` for data larger than memory), shuffled
in blocks of `buffer_size` with a generator seeded by (seed, epoch, block), packed
first-fit-decreasing within the block, and cut into batches of `batch_size` rows. Planning
needs only token counts (the processor counts image tokens from the transform's size), so it
never decodes an image.

This is what makes resuming exact: the loader's state is its position (epoch, batches
handed out), and the shuffle buffer, the packing buffer and every worker's position follow
from it. On resume each worker replays the plan — cheap, no images — up to that position.
With N workers, worker w materialises batches w, w+N, ... of the plan, which is the order in
which the DataLoader collects them, so the batches are the same for any N.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmm.data.batch import Batch, Features
from lmm.data.collate import PadCollator
from lmm.data.mixture import SkippedRecord
from lmm.data.packing import PackCollator, first_fit_decreasing
from lmm.data.processor import Processor
from lmm.data.sample import BadRecordError, Sample
from lmm.utils.errors import UserError
from lmm.utils.logging import get_logger

log = get_logger(__name__)

Records = Callable[[int], Iterable[Sample | BadRecordError]]  # epoch -> samples


class NoUsableRecordsError(UserError, RuntimeError):
    """The stream cannot yield a batch: every record of an epoch (or of a batch) was bad.

    With `on_bad_record: skip` an epoch without a batch would start the next one, and the
    next, forever; the stream stops with this error instead, naming the bad records.
    """


def _summary(errors: Sequence[BadRecordError], total: int, limit: int = 5) -> str:
    lines = [f"  {err}" for err in errors[:limit]]
    if total > len(lines):
        lines.append(f"  ... and {total - len(lines)} more")
    return "\n".join(lines)


Skip = tuple[str, str, str]  # a skipped record: (data file, record id, problem)


def skip_key(err: BadRecordError) -> Skip:
    """A skipped record as batches carry it (plain strings: it crosses worker processes)."""
    return (err.source, err.record_id, err.problem)


@dataclass
class Planned:
    """One batch of the plan: its rows of samples and its position in the epoch."""

    index: int
    rows: list[list[Sample]]
    skipped: list[Skip]  # bad records skipped since the previous batch


class TrainStream(IterableDataset):
    """Deterministic, resumable batches for training (see the module docstring)."""

    def __init__(
        self,
        samples: Records,
        processor: Processor,
        *,
        batch_size: int,
        pack_tokens: int | None = None,
        buffer_size: int = 1024,
        seed: int = 0,
        on_bad_record: str = "raise",
        group_by_modality_length: bool = False,
    ):
        """
        Args:
            samples: epoch → that epoch's samples in order (or the errors of bad records).
            processor: turns a sample into features (and counts its tokens for planning).
            batch_size: rows per batch (samples per batch when not packing).
            pack_tokens: row size in tokens when packing; None pads one sample per row.
            buffer_size: samples shuffled (and packed) together.
            seed: the shuffle seed.
            on_bad_record: `raise` stops at a bad record; `skip` drops and counts it.
            group_by_modality_length: when padding, batch media and text-only samples apart,
                each batch of similar length (LLaVA's `group_by_modality_length`).
        """
        if on_bad_record not in ("raise", "skip"):
            raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
        check_pack_tokens(pack_tokens, processor.max_length)
        self.samples = samples
        self.processor = processor
        self.batch_size = batch_size
        self.pack_tokens = pack_tokens
        self.buffer_size = buffer_size
        self.seed = seed
        self.on_bad_record = on_bad_record
        self.group_by_modality_length = group_by_modality_length
        self._errors: list[BadRecordError] = []  # the first bad records skipped, to name
        self.epoch = 0
        self.start = 0  # first batch of the epoch to hand out (resume)
        self.rank, self.world_size = 0, 1  # data-parallel rank: takes rows rank::world_size
        pad = processor.tokenizer.pad_token_id
        self._pad = PadCollator(pad)
        self._pack = PackCollator(pad, pack_tokens) if pack_tokens else None

    def _bad(self, err: BadRecordError, skipped: list[Skip]) -> None:
        """Raise a bad record (`raise`), or count it in `skipped` (`skip`, and always for a
        record a mixture rule filtered out: max_num_images, vl_only)."""
        if self.on_bad_record == "raise" and not isinstance(err, SkippedRecord):
            raise err
        log.debug("skipped: %s", err)
        skipped.append(skip_key(err))
        if len(self._errors) < 5:  # only the first few are named in an error
            self._errors.append(err)

    def plan(self) -> Iterator[Planned]:
        """The epoch's batches as rows of samples, without loading any image.

        Rows left over at the end of a block wait for the next block's, so every batch but
        the epoch's last is full. Every skipped record is counted in exactly one batch: those
        after the epoch's last good record in its last batch.
        """
        held: Planned | None = None  # one batch held back until the next is planned
        trailing: list[Skip] = []
        for item in self._plan():
            if isinstance(item, Planned):
                if held is not None:
                    yield held
                held = item
            else:
                trailing = item
        if held is not None:
            held.skipped += trailing
            yield held

    def _plan(self) -> Iterator[Planned | list[Skip]]:
        """The batches of `plan`, then the records skipped after the last one."""
        index, skipped, n_bad = 0, [], 0
        self._errors = []
        items = iter(self.samples(self.epoch))
        step = self.batch_size * self.world_size  # one global batch: every rank's rows
        pending: list[list[Sample]] = []
        for block_no in itertools.count():
            block: list[Sample] = []
            for item in items:
                if isinstance(item, BadRecordError):
                    self._bad(item, skipped)
                    n_bad += 1
                    continue
                block.append(item)
                if len(block) == self.buffer_size:
                    break
            last = len(block) < self.buffer_size  # the source is exhausted
            if block:
                rng = np.random.default_rng([self.seed, self.epoch, block_no])
                shuffled = [block[i] for i in rng.permutation(len(block))]
                before = len(skipped)
                rows, lengths = self._rows(shuffled, skipped, rng)
                n_bad += len(skipped) - before
                if self.group_by_modality_length and self.pack_tokens is None:
                    # batches of one modality each, partial ones included: never mixed
                    media = [bool(r[0].images) for r in rows]
                    for group in group_by_modality_length(lengths, media, step, rng):
                        yield Planned(index, [rows[i] for i in group], skipped)
                        index, skipped = index + 1, []
                    rows = []
                pending += rows
            while len(pending) >= step or (last and pending):
                yield Planned(index, pending[:step], skipped)
                pending, index, skipped = pending[step:], index + 1, []
            if last:
                if index == 0:
                    self._no_batch(n_bad)
                yield skipped
                return

    def _no_batch(self, n_bad: int) -> None:
        if n_bad == 0:
            raise NoUsableRecordsError(
                f"epoch {self.epoch} of the training data has no records. Fix: check data.train "
                "(an empty file, or a mixture whose sources are all empty)"
            )
        raise NoUsableRecordsError(
            f"epoch {self.epoch}: every one of the {n_bad} training records is bad, so there is "
            f"nothing to train on (on_bad_record: skip skipped them all):\n"
            f"{_summary(self._errors, n_bad)}\n"
            "Fix: repair the records (`lmm data check` lists them) or point data.train at "
            "the right file"
        )

    def _rows(
        self, samples: list[Sample], skipped: list[Skip], rng: np.random.Generator
    ) -> tuple[list[list[Sample]], list[int]]:
        """The rows of a shuffled block in batch order (packed or as shuffled), and lengths;
        samples whose tokens cannot be counted are added to `skipped`."""
        kept, lengths = [], []
        for sample in samples:
            try:
                lengths.append(self.processor.length(sample))
                kept.append(sample)
            except BadRecordError as err:
                self._bad(err, skipped)
        if self.pack_tokens is not None:
            bins = first_fit_decreasing(lengths, self.pack_tokens)
            # FFD fills rows longest-first: the first rows hold the long samples, the last the
            # short ones. Shuffle the rows so that no batch is all long or all short.
            order = rng.permutation(len(bins))
            rows = [[kept[i] for i in bins[b]] for b in order]
            return rows, [sum(lengths[i] for i in bins[b]) for b in order]
        return [[s] for s in kept], lengths

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for planned in self.plan():
            if planned.index < self.start or (planned.index - self.start) % workers != worker:
                continue
            yield self.materialise(planned)

    def materialise(self, planned: Planned) -> Batch:
        """Load the images and collate this rank's rows of one planned (global) batch.

        A rank left without rows (a short last batch, or rows that were all bad records)
        gets a copy of another rank's row with every label masked: it contributes no loss and
        no gradient, but takes part in the step. A global batch in which no sample can be
        loaded becomes an empty batch (`Batch.empty`) on every rank alike: the module skips
        its step (no weights change), and its skipped records are counted with it. Dropping
        the batch instead would shift every later batch between workers and ranks.
        """
        mine = planned.rows[self.rank :: self.world_size]
        skipped = list(planned.skipped) if self.rank == 0 else []
        rows: list[list[Features]] = []
        lost: list[BadRecordError] = []
        for row in mine:
            feats = []
            for sample in row:
                try:
                    feats.append(self.processor(sample))
                except BadRecordError as err:
                    self._bad(err, skipped)
                    lost.append(err)
            if feats:
                rows.append(feats)
        masked = not rows
        if masked:
            rows = self._borrowed_row(planned, mine)
        if not rows:
            log.warning(
                "batch %d of epoch %d: no sample of it could be loaded (on_bad_record: skip); "
                "its step is skipped:\n%s",
                planned.index,
                self.epoch,
                _summary(lost, len(lost)),
            )
            batch = Batch.empty()
        elif self._pack is not None:
            batch = self._pack.collate_rows(rows)
        else:
            batch = self._pad([f for row in rows for f in row])
        if masked and batch.labels is not None:
            batch.labels.fill_(-100)
        batch.stream_position = (self.epoch, planned.index)
        batch.skipped_records = skipped
        return batch

    def _borrowed_row(self, planned: Planned, mine: list[list[Sample]]) -> list[list[Features]]:
        """The first row of the global batch outside this rank's own that loads (its samples'
        errors are the owner rank's to count), or none."""
        for row in planned.rows:
            if any(row is own for own in mine):
                continue
            feats = []
            for sample in row:
                try:
                    feats.append(self.processor(sample))
                except BadRecordError:
                    if self.on_bad_record == "raise":
                        raise
            if feats:
                return [feats]
        return []


def check_pack_tokens(pack_tokens: int | None, max_length: int) -> None:
    """Refuse packed rows shorter than the longest sample: such a sample fits no row."""
    if pack_tokens is not None and pack_tokens < max_length:
        raise ValueError(
            f"data.pack_tokens={pack_tokens} is smaller than data.max_length={max_length}: a "
            f"sample of up to {max_length} tokens would fit no packed row. Fix: set "
            f"pack_tokens >= max_length, or lower max_length to {pack_tokens}"
        )


def group_by_modality_length(
    lengths: Sequence[int],
    has_media: Sequence[bool],
    batch_size: int,
    rng: np.random.Generator,
    megabatch: int = 8,
) -> list[list[int]]:
    """Batches of sample indices, each of one modality and of similar lengths.

    As LLaVA's `get_modality_length_grouped_indices`: media and text-only samples are split;
    each is cut (in its shuffled order) into megabatches of `megabatch` batches sorted by
    length, longest first; the batches of both modalities are then shuffled together. Only a
    last, partial batch of each modality is left as it is.
    """
    batches: list[list[int]] = []
    for modality in (True, False):
        idx = [i for i, m in enumerate(has_media) if m == modality]
        size = batch_size * megabatch
        for start in range(0, len(idx), size):
            mega = sorted(idx[start : start + size], key=lambda i: -lengths[i])
            batches += [mega[k : k + batch_size] for k in range(0, len(mega), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) < batch_size]
    return [full[i] for i in rng.permutation(len(full))] + partial


class StreamLoader(DataLoader):
    """A DataLoader over a `TrainStream` that moves to the next epoch each time it is iterated.

    Workers are not persistent: each epoch they receive the stream with its new epoch and
    start position.
    """

    def __init__(self, stream: TrainStream, num_workers: int = 0):
        super().__init__(stream, batch_size=None, num_workers=num_workers, collate_fn=_identity)
        self._started = False

    def __iter__(self):
        if self._started:
            self.dataset.epoch += 1
            self.dataset.start = 0
        self._started = True
        return super().__iter__()


def _identity(batch: Batch) -> Batch:
    return batch


def shuffled(samples: Sequence[Sample], seed: int) -> Records:
    """In-memory samples as a `Records` source, permuted as a whole each epoch."""

    def records(epoch: int) -> Iterator[Sample]:
        order = np.random.default_rng([seed, epoch, 1 << 20]).permutation(len(samples))
        return (samples[i] for i in order)

    return records
