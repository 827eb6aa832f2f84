"""A mixture's sources: the YAML entries they are read from, their sampling rules and random
access to their records (a JSON array in memory, JSON lines read by offset, or a Hugging Face
dataset). `lmm.data.mixture.Mixture` draws its epochs from them.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from lmm.data.formats import _json_line
from lmm.utils.errors import UserError
from lmm.utils.logging import get_logger

log = get_logger(__name__)

FORMATS: tuple[str, ...] = ("chat", "chat_video", "classification")
# Formats of Mantis data configs that lmm cannot read yet: their records become bad records.
UNSUPPORTED_FORMATS: tuple[str, ...] = ("qwen2_video_classification", "siglip_video")
TYPES: tuple[str, ...] = ("json", "huggingface")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Entry fields lmm acts on; Mantis's fields that lmm does not use (`_IGNORED`) are kept in
# `Source.extra` with a warning; any other field is an error naming the closest known one.
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
_IGNORED = {"offline_sha", "max_image_size", "max_seq_len", "packing_same_mm_media", "video_dir"}
_RULE = re.compile(r"^(first|end|random):(\d+(?:\.\d+)?)(%?)$")


class MixtureError(UserError, ValueError):
    """A mixture YAML that cannot be read; the message names the file and the entry."""


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


def open_store(source: Source) -> _ArrayStore | _LinesStore | _HFStore:
    """Random access to the records of a source's file (or Hugging Face dataset split)."""
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
# YAML entries → sources


def unknown_key(mapping: dict, known: set[str], where: str) -> None:
    """A `MixtureError` for the first key of `mapping` not in `known`, naming the closest
    known key: a misspelt rule (`sampling_stategy`) must not be ignored."""
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {sorted(known)}"
            raise MixtureError(
                f"{where}: unknown field {key!r}; {hint} Fix: correct or remove the field"
            )


def parse_entry(doc: Path, form: str, k: int, entry: Any) -> list[Source]:
    """The source(s) of entry `k` of a mixture YAML (several when its path has braces)."""
    where = f"{doc}: {form}[{k}]"
    path_key = "path" if form == "data" else "json_path"
    if not isinstance(entry, dict):
        raise MixtureError(f"{where}: expected a mapping with '{path_key}', got {entry!r}")
    unknown_key(entry, _USED | _IGNORED, f"{where} ({entry.get('name') or entry.get(path_key)})")
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
            "%s: Mantis field(s) %s are kept in Source.extra but not used by lmm",
            where,
            sorted(extra),
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
