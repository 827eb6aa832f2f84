"""Benchmarks from the Hugging Face hub: a task's `path: hf:<dataset>` read with `datasets`.

lmms-eval hosts each benchmark as a hub dataset (`lmms-lab/POPE`, `lmms-lab/MME`, ...): Parquet
shards whose images are embedded as `{"bytes", "path"}` cells. `record_files` loads one such
dataset (a hub id, or a local folder holding the same layout, or a `save_to_disk` folder),
writes every embedded image or video once to a content-addressed folder, turns each row into
the record the benchmark's own reader takes (`HubSource.records`, declared in the benchmark's
module) and writes those records as JSON lines. The benchmark's `read` then reads that file as
it reads the published local one: the same prompts, ids and scoring, and the images reach the
model as files, through the same loading and checks as local images.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmm.data.media import sniff_bytes
from lmm.utils.logging import get_logger

log = get_logger(__name__)

PREFIX = "hf:"
Row = dict[str, Any]

# Magic bytes of the media a hub dataset embeds, for the cached file's suffix (the loaders
# decide by content; the suffix is for people and for tools that look at names).


class HubDatasetError(FileNotFoundError):
    """A hub dataset (or its subset or split) that cannot be loaded; the message says which and
    how to get it."""


@dataclass(frozen=True)
class HubSource:
    """Where lmms-eval reads a benchmark on the hub, and how its rows become local records.

    Declared in the benchmark's module as `Benchmark(..., hub=HubSource(...))`; the defaults
    are what lmms-eval's task YAML names (`dataset_path`, `dataset_name`, `test_split`).
    """

    repo: str  # the dataset id, e.g. "lmms-lab/POPE"
    split: str  # the split scored, e.g. "test"
    subset: str | None = None  # the config read by default (None: the dataset's only one)
    subsets: tuple[str, ...] = ()  # read them all when the task names no subset (per-task configs)
    revision: str | None = None  # the git revision read by default
    # rows (media already files) -> records of the benchmark's local format; default: unchanged
    records: Callable[[Iterable[Row], HubRows], Iterable[Row]] | None = None
    media_root: bool = False  # media are not embedded: their paths are relative to the task's root

    def describe(self) -> str:
        """`repo` with its subset and split, as `lmm tasks` and the docs print it."""
        if self.subsets:
            parts = [f"{len(self.subsets)} subsets, one per subtask"]
        else:
            parts = [f"subset {self.subset}"] if self.subset else []
        parts.append(f"split {self.split}")
        if self.revision:
            parts.append(f"revision {self.revision}")
        return f"{PREFIX}{self.repo} ({', '.join(parts)})"


def is_hub(path: str | Path) -> bool:
    """Whether a task's `path` names a hub dataset (`hf:<id or folder>`)."""
    return str(path).startswith(PREFIX)


def cache_dir() -> Path:
    """Where hub media and records are written: `$LMM_HUB_CACHE`, else `lmm_hub/` in the
    `datasets` cache (`$HF_DATASETS_CACHE`, `$HF_HOME/datasets`, `~/.cache/huggingface/datasets`).
    Read at each call, so a process that changes the variables (tests) gets its own cache."""
    if os.environ.get("LMM_HUB_CACHE"):
        return Path(os.environ["LMM_HUB_CACHE"])
    return _datasets_cache() / "lmm_hub"


def _datasets_cache() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "datasets"


# --------------------------------------------------------------------------------- media


def media_suffix(data: bytes) -> str:
    """The usual suffix of an image or video from its first bytes (".bin" when unknown)."""
    found = sniff_bytes(data[:16])
    return found[2] if found else ".bin"


def _is_cell(value) -> bool:
    """A `datasets` Image/Video cell as Arrow stores it: `{"bytes": ..., "path": ...}`."""
    return isinstance(value, Mapping) and set(value) == {"bytes", "path"}


class MediaStore:
    """Embedded media written once, named by their content (`<sha256><suffix>`)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, cell: Mapping) -> str | None:
        """The file holding the cell's bytes (written if new); a cell without bytes gives its
        `path` (a file name the reader resolves against the task's `root`)."""
        data = cell.get("bytes")
        if not data:
            return cell.get("path")
        digest = hashlib.sha256(data).hexdigest()
        target = self.folder / digest[:2] / f"{digest}{media_suffix(data[:16])}"
        if not target.is_file():
            _write_atomic(target, data)
        return str(target)

    def files(self, row: Row) -> Row:
        """The row with every embedded cell (or list of cells) replaced by its file's path."""
        out = {}
        for key, value in row.items():
            if _is_cell(value):
                value = self.path(value)
            elif isinstance(value, list) and value and all(_is_cell(v) for v in value):
                value = [self.path(v) for v in value]
            out[key] = value
        return out


def _write_atomic(target: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, so a reader (or another rank) never sees
    a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------- loading


def load(ref: str, subset: str | None, split: str, revision: str | None = None):
    """One split of a dataset as a `datasets.Dataset`.

    `ref` is a hub id (`lmms-lab/POPE`, read with `datasets.load_dataset`, offline from the
    cache when `HF_HUB_OFFLINE=1`), a folder in the hub layout (Parquet or JSON files, with the
    README's `configs` naming subsets and splits, as a dataset repository holds them), or a
    folder written by `save_to_disk` (a `Dataset`, or a `DatasetDict` of splits; a subset is
    the sub-folder of that name).
    """
    import datasets

    folder = Path(ref).expanduser()
    saved = _saved_folder(folder, subset)
    where = f"{PREFIX}{ref} (subset {subset or 'default'}, split {split})"
    try:
        if saved is not None:
            data = datasets.load_from_disk(str(saved))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"no split {split!r}; the folder has {sorted(data)}")
                data = data[split]
            return data
        local = folder.is_dir()  # a folder has no git revisions: `revision` is the hub's
        kwargs = {"revision": revision} if revision and not local else {}
        return datasets.load_dataset(
            str(folder) if local else ref,
            subset,
            split=split,
            cache_dir=str(_local_cache(folder) if local else _datasets_cache()),
            **kwargs,
        )
    except Exception as err:  # datasets raises many kinds: not found, offline, unknown split
        raise HubDatasetError(
            f"{where}: cannot load it ({type(err).__name__}: {err}). Fix: check the dataset id, "
            "`subset` and `split` (docs/evaluation.md lists each benchmark's), log in "
            "(`hf auth login`) for a gated dataset, or download it while online (unset "
            "HF_HUB_OFFLINE) so that it is in the cache"
        ) from err


def _saved_folder(folder: Path, subset: str | None) -> Path | None:
    """The `save_to_disk` folder to read (`folder`, or `folder/subset`), or None."""
    for candidate in ([folder / subset] if subset else []) + [folder]:
        if (candidate / "state.json").is_file() or (candidate / "dataset_dict.json").is_file():
            return candidate
    return None


def _local_cache(folder: Path) -> Path:
    """The `datasets` cache of a local folder, one per version of its files: `datasets` keys
    its cache of a folder by the folder's name and file patterns, so two folders named `POPE`,
    or one whose files changed, would otherwise share (and reuse) one cache."""
    digest = hashlib.sha1(str(folder.resolve()).encode())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir() / "datasets" / digest.hexdigest()[:16]


def iter_rows(dataset, batch_size: int = 256) -> Iterator[Row]:
    """The dataset's rows as plain Python values, media cells undecoded (`{"bytes", "path"}`)."""
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        yield from batch.to_pylist()


@dataclass
class HubRows:
    """What a benchmark's `HubSource.records` gets besides the rows: the subset and split read,
    and `load(subset)`, the rows (media as files) of another subset of the same dataset
    (GQA keeps its images in `testdev_balanced_images`)."""

    ref: str
    subset: str | None
    split: str
    revision: str | None
    media: MediaStore

    def load(self, subset: str | None, split: str | None = None) -> Iterator[Row]:
        """Rows of another subset (same split unless given), embedded media written as files."""
        data = load(self.ref, subset, split or self.split, self.revision)
        return (self.media.files(row) for row in iter_rows(data))


def record_files(
    ref: str,
    source: HubSource | None,
    *,
    subset: str | Sequence[str] | None = None,
    split: str | None = None,
    revision: str | None = None,
    task: str = "task",
) -> list[Path]:
    """JSON-lines files of local-format records, one per subset read, from `hf:<ref>`.

    `subset`, `split` and `revision` default to `source`'s (lmms-eval's). A task without a
    subset reads all of `source.subsets` when the benchmark has one config per subtask
    (MVBench, BLINK). The files are rewritten at each call (rows of a hub dataset can change
    with its revision); the media folder is shared and only grows.
    """
    ref = ref.removeprefix(PREFIX)
    split = split or (source.split if source else None)
    if not split:
        raise ValueError(
            f"task {task!r}: no split to read {PREFIX}{ref}: the benchmark declares no hub "
            "dataset with a default split. Fix: give the task's `split` (and `subset`)"
        )
    revision = revision or (source.revision if source else None)
    if subset is None and source is not None:
        subsets: list[str | None] = list(source.subsets) or [source.subset]
    elif isinstance(subset, str) or subset is None:
        subsets = [subset]
    else:
        subsets = list(subset)
    root = cache_dir()
    media = MediaStore(root / "media")
    files = []
    for name in subsets:
        rows = HubRows(ref, name, split, revision, media)
        records: Iterable[Row] = rows.load(name)
        if source is not None and source.records is not None:
            records = source.records(records, rows)
        target = root / "records" / _slug(ref, revision) / (name or "default") / f"{split}.jsonl"
        try:
            count = _write_records(target, records)
        except KeyError as err:  # a mapping met a row without a column it needs
            raise HubDatasetError(
                f"task {task!r}: the rows of {PREFIX}{ref} (subset {name or 'default'}, split "
                f"{split}) have no column {err}, which this benchmark's hub copy has. Fix: point "
                "`path` at the benchmark's dataset (`lmm tasks` lists them)"
            ) from err
        log.info("task %r: %d records of %s%s (%s, %s) in %s", task, count, PREFIX, ref,
                 name or "default", split, target)  # fmt: skip
        files.append(target)
    return files


def _slug(ref: str, revision: str | None) -> str:
    """A folder name for a dataset: the hub id and revision (`lmms-lab--POPE`), or a local
    folder's name and a hash of its absolute path."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        where = str(folder.resolve())
        return f"local--{folder.resolve().name}--{hashlib.sha1(where.encode()).hexdigest()[:10]}"
    name = ref.replace("/", "--")
    return f"{name}@{revision}" if revision else name


def _write_records(target: Path, records: Iterable[Row]) -> int:
    lines = [json.dumps(rec, ensure_ascii=False, default=str) + "\n" for rec in records]
    _write_atomic(target, "".join(lines).encode("utf-8"))
    return len(lines)
