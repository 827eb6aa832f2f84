"""Data mixtures: several data files with sampling rules, read as one deterministic stream.

A mixture YAML comes in one of two forms (docs/mixtures.md):
- Mantis data config: `data: [{name, type, path, format, split, max_size, shuffle, ...}]`,
  with Mantis's dataset balancing (source i gets `int(total · min(1.1·√nᵢ/Σ√n, 1))` samples);
- LLaVA-NeXT: `datasets: [{json_path, sampling_strategy: all | first:N | end:N | random:N}]`,
  where N is a count or a percentage (`first:10%`).
A path may hold brace alternatives, `data/{a,b}.json`, which expand to one source per file.

One epoch is a pure function of (files, seed, epoch): each source contributes a fixed array of
record indices (rules and balancing are applied once, at load), and the concatenation of those
arrays is permuted by a generator seeded with (seed, epoch).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from lmm.data.formats import VideoOptions, _json_line, parse_record
from lmm.data.policy import Preprocessing
from lmm.data.sample import IMAGE_MARKER, BadRecordError, Sample
from lmm.utils.logging import get_logger

log = get_logger(__name__)

FORMATS: tuple[str, ...] = ("chat", "chat_video", "classification")
# Formats of Mantis data configs that lmm cannot read yet: their records become bad records.
UNSUPPORTED_FORMATS: tuple[str, ...] = ("qwen2_video_classification", "siglip_video")
TYPES: tuple[str, ...] = ("json", "huggingface")
SPLITS: tuple[str, ...] = ("train", "val", "test")
BALANCING_FACTOR = 1.1  # Mantis DatasetCollection: min(1.1 · √nᵢ/Σ√n, 1)
MANTIS_SHUFFLE_SEED = 42  # Mantis `shuffle: true`: random.seed(42); random.shuffle(data)

# Entry fields lmm acts on; any other field is kept in `Source.extra` with a warning.
_USED = {
    "name",
    "type",
    "path",
    "json_path",
    "format",
    "split",
    "max_size",
    "shuffle",
    "max_num_images",
    "max_num_frames",
    "fps",
    "vl_only",
    "sampling_strategy",
    "root",
    "image_folder",
    "images_folder",
    "revision",
}
_TOP_LEVEL = {"data", "datasets", "dataset_balancing", "shuffle"}
_RULE = re.compile(r"^(first|end|random):(\d+(?:\.\d+)?)(%?)$")


class MixtureError(ValueError):
    """A mixture YAML that cannot be read; the message names the file and the entry."""


class SkippedRecord(BadRecordError):
    """A record a source's filter leaves out on purpose (`max_num_images`, `vl_only`).

    It takes a bad record's place in the stream, so it is counted (TrainStream with
    `on_bad_record: skip`, `lmm data check`) instead of vanishing; it is not a data error.
    """


@dataclass(frozen=True)
class Rule:
    """A sampling rule: `all`, or `first|end|random:N` with N a count or a percentage."""

    kind: str = "all"
    number: Fraction | None = None
    percent: bool = False

    @classmethod
    def parse(cls, text: Any) -> Rule:
        """Parse `all`, `first:N`, `end:N`, `random:N` or `...:N%`; ValueError otherwise."""
        spec = str(text).strip()
        if spec == "all":
            return cls()
        match = _RULE.match(spec)
        if match is None:
            raise ValueError(
                f"sampling_strategy {text!r} is not one of all, first:N, end:N, random:N "
                "(N a count like 1000 or a percentage like 10%)"
            )
        kind, number, percent = match.groups()
        if not percent and "." in number:
            raise ValueError(f"sampling_strategy {text!r}: a count must be a whole number")
        return cls(kind, Fraction(number), bool(percent))

    def count(self, n: int) -> int:
        """How many of `n` records the rule asks for (percentages round up, as LLaVA-NeXT)."""
        if self.number is None:
            return n
        if self.percent:
            return math.ceil(self.number * n / 100)
        return int(self.number)

    def __str__(self) -> str:
        if self.number is None:
            return "all"
        number = (
            str(self.number.numerator) if self.number.denominator == 1 else str(float(self.number))
        )
        return f"{self.kind}:{number}{'%' if self.percent else ''}"


@dataclass
class Source:
    """One data file of a mixture and how its records are drawn."""

    name: str
    path: str  # the data file (or a Hugging Face dataset id for type huggingface)
    format: str = "chat"
    rule: str = "all"  # all | first:N | end:N | random:N (N a count or N%)
    split: str = "train"
    type: str = "json"
    root: str | None = None  # media folder (default: the data file's folder)
    shuffle: bool = False  # Mantis: permute the file with seed 42 before the rule
    max_num_images: int | None = None  # records with more images are skipped and counted
    max_num_frames: int | None = None  # frames kept of a video (or of chat_video frame lists)
    fps: float | None = None  # sample a video's frames at this rate (at most max_num_frames)
    vl_only: bool = False  # text-only records are skipped and counted
    extra: dict = field(default_factory=dict)  # fields lmm does not use (kept, warned about)
    where: str = ""  # "mix.yaml: data[2] (nlvr2)", for messages
    size: int = 0  # records in the file (set at load)
    selected: int = 0  # distinct records the rule keeps (set at load)
    labels: list[str] | None = None  # classification: label order, from the first record
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    @property
    def count(self) -> int:
        """Samples this source gives per epoch (with balancing, some records repeat)."""
        return len(self.indices)


def expand_braces(path: str) -> list[str]:
    """`data/{a,b}.json` → `[data/a.json, data/b.json]`; several groups expand left to right."""
    start = path.find("{")
    if start < 0:
        if "}" in path:
            raise ValueError(f"path {path!r} has a '}}' without a '{{'")
        return [path]
    end = path.find("}", start)
    if end < 0 or "{" in path[start + 1 : end]:
        raise ValueError(f"path {path!r}: braces must be closed and not nested, like {{a,b}}")
    head, options, tail = path[:start], path[start + 1 : end].split(","), path[end + 1 :]
    return [head + option + rest for option in options for rest in expand_braces(tail)]


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
# Record stores: random access to the records of one file


class _ArrayStore:
    """A JSON array, held in memory."""

    def __init__(self, path: Path, records: list):
        self.path = path
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> Any:
        return self.records[i]


class _LinesStore:
    """A JSON-lines file: line offsets in memory, each record read and parsed on access.

    Reads use `os.pread` on a descriptor opened per process, so forked loader workers never
    share a file position.
    """

    def __init__(self, path: Path):
        self.path = path
        starts, ends, lines = [], [], []
        offset = 0
        with path.open("rb") as f:
            for line_no, line in enumerate(f):
                if line.strip():
                    starts.append(offset)
                    ends.append(offset + len(line))
                    lines.append(line_no)
                offset += len(line)
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.asarray(ends, np.int64)
        self.lines = np.asarray(lines, np.int64)
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def get(self, i: int) -> Any:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        assert self._fd is not None
        start, end = int(self.starts[i]), int(self.ends[i])
        return _json_line(os.pread(self._fd, end - start, start), self.path, int(self.lines[i]))


class _HFStore:
    """A Hugging Face dataset split (memory-mapped Arrow)."""

    def __init__(self, source: Source, name: str | None):
        from datasets import load_dataset

        kwargs = {"revision": source.extra["revision"]} if "revision" in source.extra else {}
        self.path = Path(source.path)
        self.data = load_dataset(source.path, name, split=source.split, **kwargs)

    def __len__(self) -> int:
        return len(self.data)

    def get(self, i: int) -> Any:
        return self.data[i]


def _open_store(source: Source) -> _ArrayStore | _LinesStore | _HFStore:
    if source.type == "huggingface":
        return _HFStore(source, source.extra.get("hf_name"))
    path = Path(source.path)
    if not path.is_file():
        hint = (
            " (relative paths in a mixture YAML resolve against the YAML's folder)"
            if source.where and source.where != source.path
            else ""
        )
        raise MixtureError(f"{source.where or source.name}: data file {path} does not exist{hint}")
    with path.open("rb") as f:
        head = f.read(1024).lstrip()
    if path.suffix == ".jsonl" or not head.startswith(b"["):
        return _LinesStore(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MixtureError(
            f"{source.where or source.name}: {path} is not valid JSON ({err})"
        ) from err
    if not isinstance(records, list):
        raise MixtureError(
            f"{path}: expected a JSON array of records, got {type(records).__name__}"
        )
    return _ArrayStore(path, records)


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
        self._stores = [_open_store(s) for s in self.sources]
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
        unknown = sorted(set(doc) - _TOP_LEVEL)
        if unknown:
            log.warning("%s: top-level field(s) %s are not used by lmm", path, unknown)
        entries = doc[form]
        if not isinstance(entries, list) or not entries:
            raise MixtureError(f"{path}: '{form}' must be a non-empty list of sources")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        sources = [
            s
            for k, e in enumerate(entries)
            for s in _parse_entry(path, form, k, e)
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
        cls, path: str | Path, split: str = "train", *, seed: int = 0, **kwargs: Any
    ) -> Mixture:
        """A mixture YAML, or json/jsonl file(s) (`data/{a,b}.json` allowed) taken whole."""
        text = str(path)
        if Path(text).suffix in (".yaml", ".yml"):
            return cls.from_yaml(text, split, seed=seed, **kwargs)
        sources = [Source(name=Path(p).stem, path=p, where=p) for p in expand_braces(text)]
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


# ---------------------------------------------------------------------------------------------
# YAML entries → sources


def _parse_entry(doc: Path, form: str, k: int, entry: Any) -> list[Source]:
    """The source(s) of entry `k` of a mixture YAML (several when its path has braces)."""
    where = f"{doc}: {form}[{k}]"
    path_key = "path" if form == "data" else "json_path"
    if not isinstance(entry, dict):
        raise MixtureError(f"{where}: expected a mapping with '{path_key}', got {entry!r}")
    raw = entry.get(path_key, entry.get("json_path" if form == "data" else "path"))
    name = entry.get("name")
    if raw is None:
        raise MixtureError(
            f"{where}{f' ({name})' if name else ''}: no '{path_key}'. "
            f"Fix: give the data file of this entry, e.g. {path_key}: data/train.json"
        )
    where = f"{where} ({name or raw})"

    def bad(problem: str) -> MixtureError:
        return MixtureError(f"{where}: {problem}")

    fmt = entry.get("format", "chat")
    if fmt not in FORMATS + UNSUPPORTED_FORMATS:
        raise bad(f"format {fmt!r} is not one of {FORMATS}")
    if fmt in UNSUPPORTED_FORMATS:
        log.warning(
            "%s: format %r is not yet supported by lmm; its records will be bad", where, fmt
        )
    split = entry.get("split", "train")
    if split not in SPLITS:
        raise bad(f"split {split!r} is not one of {SPLITS}")
    json_like = str(raw).endswith((".json", ".jsonl"))
    kind = entry.get("type", "json" if form == "datasets" or json_like else "huggingface")
    if kind not in TYPES:
        raise bad(f"type {kind!r} is not one of {TYPES}")

    ints = {}
    for key in ("max_size", "max_num_images", "max_num_frames"):
        value = entry.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise bad(f"{key} must be a whole number >= 0, got {value!r}")
        ints[key] = value
    if "sampling_strategy" in entry and ints["max_size"] is not None:
        raise bad("give sampling_strategy or max_size, not both (max_size N is first:N)")
    try:
        rule = Rule.parse(entry.get("sampling_strategy", "all"))
    except ValueError as err:
        raise bad(str(err)) from None
    if ints["max_size"] is not None:
        rule = Rule("first", Fraction(ints["max_size"]))
    fps = entry.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise bad(f"fps must be a number > 0, got {fps!r}")
    for key in ("shuffle", "vl_only"):
        if not isinstance(entry.get(key, False), bool):
            raise bad(f"{key} must be true or false, got {entry[key]!r}")

    root = entry.get("root", entry.get("image_folder", entry.get("images_folder")))
    if root is None and fmt == "chat_video":
        root = entry.get("video_dir")  # Mantis: chat_video frames live under video_dir
    used = set(_USED) | ({"video_dir"} if fmt == "chat_video" else set())
    extra = {key: value for key, value in entry.items() if key not in used}
    if extra:
        log.warning(
            "%s: field(s) %s are kept in Source.extra but not used by lmm", where, sorted(extra)
        )
    if "revision" in entry:
        extra["revision"] = entry["revision"]

    try:
        paths = expand_braces(str(raw)) if kind == "json" else [str(raw)]
    except ValueError as err:
        raise bad(str(err)) from None
    sources = []
    for p in paths:
        resolved = doc.parent / p
        if kind == "huggingface" and not resolved.exists():
            resolved = Path(p)  # a hub id, not a local folder
        label = Path(p).stem
        source_name = (f"{name}/{label}" if len(paths) > 1 else name) if name else label
        source = Source(
            name=str(source_name),
            path=str(resolved),
            format=fmt,
            rule=str(rule),
            split=split,
            type=kind,
            root=str(doc.parent / root) if root is not None else None,
            shuffle=bool(entry.get("shuffle", False)),
            max_num_images=ints["max_num_images"],
            max_num_frames=ints["max_num_frames"],
            fps=float(fps) if fps is not None else None,
            vl_only=bool(entry.get("vl_only", False)),
            extra=dict(extra),
            where=where if len(paths) == 1 else f"{where} → {p}",
        )
        if kind == "huggingface":
            source.extra["hf_name"] = name  # the dataset's config name, as Mantis passes it
        sources.append(source)
    return sources
