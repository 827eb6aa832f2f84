"""Data mixtures: several data files with sampling rules, read as one deterministic stream.

A mixture YAML comes in one of two forms (docs/mixtures.md):
- Mantis data config: `data: [{name, type, path, format, split, max_size, shuffle, ...}]`,
  with Mantis's dataset balancing (source i gets `int(total · min(1.1·√nᵢ/Σ√n, 1))` samples);
- LLaVA-NeXT: `datasets: [{json_path, sampling_strategy: all | first:N | end:N | random:N}]`,
  where N is a count or a percentage (`first:10%`).
A path may hold brace alternatives, `data/{a,b}.json`, which expand to one source per file.

One epoch is a pure function of (files, seed, epoch): each source contributes a fixed array of
record indices (rules and balancing are applied once, at load), and the concatenation of those
arrays is permuted by a generator seeded with (seed, epoch). The sources (YAML entries, rules,
record stores) are in `lmm.data.sources`.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmm.data.formats import VideoOptions, parse_record
from lmm.data.policy import Preprocessing
from lmm.data.sample import IMAGE_MARKER, BadRecordError, Sample
from lmm.data.sources import (
    SPLITS,
    UNSUPPORTED_FORMATS,
    MixtureError,
    Rule,
    Source,
    expand_braces,
    open_store,
    parse_entry,
    unknown_key,
)
from lmm.utils.logging import get_logger

log = get_logger(__name__)

BALANCING_FACTOR = 1.1  # Mantis DatasetCollection: min(1.1 · √nᵢ/Σ√n, 1)
MANTIS_SHUFFLE_SEED = 42  # Mantis `shuffle: true`: random.seed(42); random.shuffle(data)

_TOP_LEVEL = {"data", "datasets", "dataset_balancing", "shuffle"}


class SkippedRecord(BadRecordError):
    """A record a source's filter leaves out on purpose (`max_num_images`, `vl_only`).

    It takes a bad record's place in the stream, so it is counted (TrainStream with
    `on_bad_record: skip`, `lmm data check`) instead of vanishing; it is not a data error.
    """


def balanced_counts(sizes: Sequence[int], factor: float = BALANCING_FACTOR) -> list[int]:
    """Mantis's dataset balancing: source i gets `int(total · min(factor · √nᵢ/Σ√n, 1))`.

    The arithmetic follows Mantis's `DatasetCollection` operation by operation, so the counts
    match it exactly, float truncation included.
    """
    total = sum(sizes)
    sqrt_sizes = [math.sqrt(n) for n in sizes]
    sum_sqrt = sum(sqrt_sizes)
    if sum_sqrt == 0:
        return [0] * len(sizes)
    probs = [s / sum_sqrt for s in sqrt_sizes]
    return [int(total * min(p * factor, 1)) for p in probs]


# ---------------------------------------------------------------------------------------------
# Mantis's chat_video records given as frames


def _frames_as_images(record: dict, max_frames: int | None) -> dict:
    """A chat_video record given as frames, as Mantis reads it: frames subsampled, markers moved.

    Mantis keeps frames `arange(0, n, n / max_num_frames)` and removes `<image>` from the text;
    the chat reader then places one marker per frame at the start of the first user turn.
    """
    frames = record.get("images") or record.get("image")
    if not frames:
        return record
    if isinstance(frames, (str, dict)):
        frames = [frames]
    if max_frames and len(frames) > max_frames:
        keep = np.arange(0, len(frames), len(frames) / max_frames).astype(int)
        frames = [frames[k] for k in keep]
    out = {k: v for k, v in record.items() if k != "image"}
    out["images"] = frames
    for key in ("conversation", "conversations"):
        if isinstance(record.get(key), list):
            out[key] = [_strip_markers(msg) for msg in record[key]]
    return out


def _strip_markers(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    out = dict(message)
    for key in ("content", "value"):
        if isinstance(out.get(key), str):
            out[key] = out[key].replace(IMAGE_MARKER, "").strip("\n ")
    return out


# ---------------------------------------------------------------------------------------------
# The mixture


class Mixture:
    """Sources with sampling rules, read as one deterministic, reproducible sequence per epoch.

    `samples` is a TrainStream `samples` callable as it is (a bound method, epoch → samples);
    bind media options with `functools.partial(mixture.samples, root=..., ...)`.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        seed: int = 0,
        shuffle: bool = True,
        balancing: bool = False,
        name: str = "<memory>",
    ):
        """
        Args:
            sources: the data files and their rules; their `size`, `selected` and `indices`
                are filled here from the files.
            seed: seeds `random:N` draws (once, per source) and the epoch order (per epoch).
            shuffle: permute each epoch's records across sources; False keeps source order.
            balancing: Mantis's √n balancing of the sources' sizes after their rules.
            name: what the mixture was read from, for messages.
        """
        if not sources:
            raise MixtureError(f"{name}: the mixture has no sources")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.sources = list(sources)
        self.seed = seed
        self.shuffle = shuffle
        self.balancing = balancing
        self.name = name
        self._stores = [open_store(s) for s in self.sources]
        picks = [
            self._select(s, store) for s, store in zip(self.sources, self._stores, strict=True)
        ]
        counts = balanced_counts([len(p) for p in picks]) if balancing else [len(p) for p in picks]
        for source, pick, count, store in zip(
            self.sources, picks, counts, self._stores, strict=True
        ):
            source.selected = len(pick)
            if source.format == "classification" and source.labels is None and len(pick):
                # Mantis takes the label order from the first record of the subset.
                first = store.get(int(pick[0]))
                if isinstance(first, dict) and isinstance(first.get("labels"), dict):
                    source.labels = list(first["labels"])
            # Mantis indexes a balanced subset modulo its length: repeats, or a prefix.
            source.indices = pick[np.arange(count) % len(pick)] if len(pick) else pick[:0]
        log.info(
            "mixture %s: %s",
            name,
            ", ".join(f"{s.name} {s.count}/{s.size} ({s.rule})" for s in self.sources),
        )

    def _select(self, source: Source, store) -> np.ndarray:
        """The record indices `source.rule` keeps, in order (after Mantis's `shuffle`)."""
        rule = Rule.parse(source.rule)
        source.size = n = len(store)
        order = list(range(n))
        if source.shuffle:
            random.Random(MANTIS_SHUFFLE_SEED).shuffle(order)
        order_arr = np.asarray(order, np.int64)
        k = rule.count(n)
        if k > n:
            log.warning(
                "%s: %s asks for %d records but %s has %d; taking all",
                source.where or source.name,
                rule,
                k,
                source.path,
                n,
            )
            k = n
        if rule.kind == "first" or rule.kind == "all":
            return order_arr[:k]
        if rule.kind == "end":
            return order_arr[n - k :]
        # random: one draw per (seed, source name), kept for every epoch (docs/mixtures.md).
        rng = np.random.default_rng([self.seed, zlib.crc32(source.name.encode())])
        return order_arr[rng.permutation(n)[:k]]

    # --- reading YAML -------------------------------------------------------------------------

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        split: str = "train",
        *,
        seed: int = 0,
        shuffle: bool | None = None,
        balancing: bool | None = None,
    ) -> Mixture:
        """The sources of `split` in a Mantis (`data:`) or LLaVA-NeXT (`datasets:`) YAML.

        `shuffle` None takes the YAML's `shuffle` (default True); `balancing` None takes the
        YAML's `dataset_balancing`, else True for a Mantis train split, False otherwise.
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mixture YAML {path} does not exist")
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise MixtureError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(doc, dict) or ("data" in doc) == ("datasets" in doc):
            keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise MixtureError(
                f"{path}: expected a top-level 'data:' list (Mantis data config) or "
                f"'datasets:' list (LLaVA-NeXT), exactly one of them; got {keys}"
            )
        form = "data" if "data" in doc else "datasets"
        unknown_key(doc, _TOP_LEVEL, str(path))
        entries = doc[form]
        if not isinstance(entries, list) or not entries:
            raise MixtureError(f"{path}: '{form}' must be a non-empty list of sources")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        sources = [
            s
            for k, e in enumerate(entries)
            for s in parse_entry(path, form, k, e)
            if s.split == split
        ]
        if not sources:
            raise MixtureError(f"{path}: no source has split {split!r}")
        if balancing is None:
            balancing = bool(doc.get("dataset_balancing", form == "data" and split == "train"))
        if shuffle is None:
            shuffle = bool(doc.get("shuffle", True))
        return cls(sources, seed=seed, shuffle=shuffle, balancing=balancing, name=str(path))

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        split: str = "train",
        *,
        seed: int = 0,
        video: VideoOptions | None = None,
        labels: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Mixture:
        """A mixture YAML, or json/jsonl file(s) (`data/{a,b}.json` allowed) taken whole.

        `video` (frames sampled per video) and `labels` (score names, in target order) apply to
        json files, as ChatDataModule's `max_frames`, `fps` and `labels` do; a mixture YAML's
        sources give their own.
        """
        text = str(path)
        if Path(text).suffix in (".yaml", ".yml"):
            return cls.from_yaml(text, split, seed=seed, **kwargs)
        video = video or VideoOptions()
        options = dict(max_num_frames=video.max_frames, fps=video.fps)
        options["labels"] = list(labels) if labels is not None else None
        sources = [
            Source(name=Path(p).stem, path=p, where=p, **options) for p in expand_braces(text)
        ]
        kwargs.setdefault("shuffle", False)  # one file: keep its order (TrainStream shuffles)
        kwargs["balancing"] = bool(kwargs.get("balancing"))
        return cls(sources, seed=seed, name=text, **kwargs)

    # --- reading records ----------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(s.count for s in self.sources)

    def order(self, epoch: int) -> np.ndarray:
        """`[N, 2]` (source number, record index) of the epoch, in the order they are read."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        src = np.repeat(np.arange(len(self.sources)), [s.count for s in self.sources])
        idx = np.concatenate([s.indices for s in self.sources])
        pairs = np.stack([src, idx], axis=1).astype(np.int64)  # [N, 2]
        if self.shuffle:
            pairs = pairs[np.random.default_rng([self.seed, int(epoch)]).permutation(len(pairs))]
        return pairs

    def record(self, source_no: int, index: int) -> dict | BadRecordError:
        """Record `index` of source `source_no`, or the error of an unreadable record."""
        record = self._stores[source_no].get(index)
        if isinstance(record, BadRecordError) or isinstance(record, dict):
            return record
        return BadRecordError(
            self.sources[source_no].path,
            f"#{index}",
            f"record is a {type(record).__name__}, not a JSON object",
        )

    def records(self, epoch: int) -> Iterator[tuple[str, int, dict]]:
        """(data file, record index, record) of the epoch; an unreadable record raises."""
        for s, i in self.order(epoch):
            record = self.record(int(s), int(i))
            if isinstance(record, BadRecordError):
                raise record
            yield self.sources[s].path, int(i), record

    def sample(
        self,
        source_no: int,
        index: int,
        *,
        root: str | Path | None = None,
        allow_outside_root: bool = False,
        check_media: bool = True,
        policy: Preprocessing | None = None,
    ) -> Sample | BadRecordError:
        """Record `index` of source `source_no` as a Sample, or the error saying why not."""
        source = self.sources[source_no]
        record = self.record(source_no, index)
        if isinstance(record, BadRecordError):
            return record
        record_id = str(record.get("id", f"#{index}"))
        if source.format in UNSUPPORTED_FORMATS:
            return BadRecordError(
                source.path,
                record_id,
                f"format {source.format!r} (source {source.name!r}) is not yet supported by lmm",
                "drop the source from the mixture or convert its records to chat records",
            )
        if source.format == "chat_video" and record.get("video") is None:
            record = _frames_as_images(record, source.max_num_frames)
        media_root = source.root if source.root is not None else root
        try:
            sample = parse_record(
                record,
                source=source.path,
                root=media_root,
                index=index,
                check_media=check_media,
                allow_outside_root=allow_outside_root,
                video=self._video_options(source),
                labels=source.labels,
                policy=policy,
            )
        except BadRecordError as err:
            return err
        if source.format == "classification" and sample.target is None:
            return BadRecordError(
                source.path,
                sample.id,
                f"a chat record in the classification source {source.name!r}: no 'labels' scores",
                "give the record a prompt and labels, or move it to a chat source",
            )
        limit = source.max_num_images
        if limit is not None and source.format != "chat_video" and len(sample.images) > limit:
            return SkippedRecord(
                source.path,
                sample.id,
                f"{len(sample.images)} images, more than max_num_images={limit} of source "
                f"{source.name!r}",
                "raise max_num_images in the mixture YAML to keep such records",
            )
        if source.vl_only and not sample.images:
            return SkippedRecord(
                source.path,
                sample.id,
                f"text-only record in source {source.name!r}, which sets vl_only",
                "unset vl_only to keep text-only records",
            )
        return sample

    @staticmethod
    def _video_options(source: Source) -> VideoOptions:
        """How a source's videos are sampled: its max_num_frames and fps, else the defaults."""
        default = VideoOptions()
        return VideoOptions(
            max_frames=source.max_num_frames or default.max_frames,
            fps=source.fps,
        )

    def samples(
        self,
        epoch: int,
        *,
        root: str | Path | None = None,
        allow_outside_root: bool = False,
        check_media: bool = True,
        keep_skipped: bool = True,
        policy: Preprocessing | None = None,
    ) -> Iterator[Sample | BadRecordError]:
        """The epoch's samples in order, each bad or skipped record's error in its place.

        Media paths resolve against the source's `root`, else `root`, else the folder of the
        source's data file. With `keep_skipped=False` the records a source's filter skips
        (`SkippedRecord`) are left out instead of yielded, for a TrainStream that raises on
        bad records; they are still counted in the log line at the end of the epoch.
        """
        skipped: Counter[str] = Counter()
        for s, i in self.order(epoch):
            item = self.sample(
                int(s),
                int(i),
                root=root,
                allow_outside_root=allow_outside_root,
                check_media=check_media,
                policy=policy,
            )
            if isinstance(item, SkippedRecord):
                skipped[self.sources[s].name] += 1
                if not keep_skipped:
                    continue
            yield item
        if skipped:
            log.info("mixture %s, epoch %d: skipped %s", self.name, epoch, dict(skipped))

    def summary(self) -> list[dict]:
        """One row per source: name, path, format, rule, size, selected, count."""
        return [
            {
                "name": s.name,
                "path": s.path,
                "format": s.format,
                "rule": s.rule,
                "size": s.size,
                "selected": s.selected,
                "count": s.count,
            }
            for s in self.sources
        ]
