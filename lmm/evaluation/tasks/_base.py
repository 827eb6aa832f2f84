"""What every benchmark file shares: record reading, `Sample` building and a per-group mean metric."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torchmetrics import Metric

from lmm.data.formats import read_records
from lmm.data.sample import BadRecordError, Media, Part, Sample, Turn

SWP = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(index, record)` from a JSON array, a JSON object of records, or JSON lines."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            # ScienceQA's problems.json and similar: {id: record}; the key becomes the id.
            for i, (key, rec) in enumerate(data.items()):
                if not isinstance(rec, dict):
                    raise BadRecordError(path, str(key), f"record is a {type(rec).__name__}")
                yield i, {"_key": key, **rec}
            return
    for i, rec in read_records(path):
        if not isinstance(rec, dict):
            raise BadRecordError(path, f"#{i}", f"record is a {type(rec).__name__}, not an object")
        yield i, rec


def field(rec: Mapping, key: str | Sequence[str], source: str | Path, rid: str, kind: type = str):
    """`rec[key]` (first present of several keys), or a `BadRecordError` naming file and record."""
    keys = [key] if isinstance(key, str) else list(key)
    for k in keys:
        if k in rec and rec[k] is not None:
            value = rec[k]
            if kind is not object and not isinstance(value, kind):
                raise BadRecordError(
                    source, rid, f"field {k!r} is {type(value).__name__}, expected {kind.__name__}"
                )
            return value
    raise BadRecordError(source, rid, f"missing field {' or '.join(map(repr, keys))}")


def resolve(
    rel: str | Path, root: str | Path | None, source: str | Path, rid: str, check: bool
) -> Path:
    """`root / rel`, `root` defaulting to the folder of the `source` file; with `check`, a
    missing file is a `BadRecordError`."""
    path = Path(rel)
    if not path.is_absolute():
        path = (Path(root) if root is not None else Path(source).parent) / path
    if check and not path.is_file():
        raise BadRecordError(source, rid, f"media not found: {path}", "check the path and `root`")
    return path


def image_first(
    sid: str,
    prompt: str,
    images: list[Path],
    source: str | Path,
    meta: dict,
    system: str | None = None,
) -> Sample:
    """A one-turn sample with every image first, each followed by a newline (LLaVA's layout)."""
    parts: list[Part] = [p for i in range(len(images)) for p in (Media(i), "\n")]
    parts.append(prompt)
    turns = [Turn("system", [system])] if system else []
    turns.append(Turn("user", parts))
    return Sample(sid, turns, images, source=str(source), meta=meta)


def interleaved(
    sid: str, text: str, images: list[Path], source: str | Path, meta: dict, marker: str
) -> Sample:
    """A one-turn sample whose text holds `marker` once per image; none puts them all first."""
    pieces = text.split(marker)
    n = len(pieces) - 1
    if n == 0:
        return image_first(sid, text, images, source, meta)
    if n != len(images):
        raise BadRecordError(
            source, sid, f"{n} {marker} markers but {len(images)} images",
            f"give one {marker} per image, or none",
        )  # fmt: skip
    parts: list[Part] = []
    for k, piece in enumerate(pieces):
        if k:
            parts.append(Media(k - 1))
        if piece:
            parts.append(piece)
    return Sample(sid, [Turn("user", parts)], images, source=str(source), meta=meta)


def numbered_markers(text: str, pattern: str) -> list[int]:
    """The numbers of the markers matched by `pattern` (one group), in order of appearance."""
    return [int(m) for m in re.findall(pattern, text)]


class GroupedMean(Metric):
    """Mean score per group (benchmark subtask) over a fixed list of groups, ×100.

    The groups are fixed at construction so that the states are plain tensors that sum across
    ranks; a prediction for a group not in the list is an error, not a silent new bucket.
    """

    full_state_update = False

    def __init__(self, groups: Sequence[str]):
        """
        Args:
            groups: every group (subtask, category, answer type) a sample may belong to.
        """
        super().__init__()
        if not groups:
            raise ValueError("GroupedMean needs at least one group name")
        self.groups = list(groups)
        self._index = {g: i for i, g in enumerate(self.groups)}
        n = len(self.groups)
        self.add_state("sums", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, group: str, score: float) -> None:
        i = self._index.get(group)
        if i is None:
            raise ValueError(
                f"{type(self).__name__}: unknown group {group!r}; known: {self.groups}. "
                "Pass every group name to the constructor"
            )
        self.sums[i] += float(score)
        self.counts[i] += 1

    def _per_group(self) -> dict[str, torch.Tensor]:
        means = 100 * self.sums / self.counts.clamp(min=1)
        return {g: means[i] for i, g in enumerate(self.groups) if self.counts[i] > 0}

    def _overall(self) -> torch.Tensor:
        """Instance-weighted mean ×100."""
        return 100 * self.sums.sum() / self.counts.sum().clamp(min=1)

    def _macro(self) -> torch.Tensor:
        """Unweighted mean over the groups that have samples ×100."""
        seen = self.counts > 0
        if not seen.any():
            return torch.tensor(0.0, dtype=torch.float64)
        return (100 * self.sums[seen] / self.counts[seen]).mean()


class LetterAccuracy(GroupedMean):
    """Accuracy ×100 of parsed answers against the sample's `meta["answer"]` (one group)."""

    def __init__(self):
        """No arguments: the task's `parse` turns outputs into answers."""
        super().__init__(["all"])

    def update(self, predictions: Sequence[str], metas: Sequence[Mapping]) -> None:
        """Add parsed answers with their samples' `meta` (needs `answer`)."""
        for pred, meta in zip(predictions, metas, strict=True):
            self._add("all", pred == meta["answer"])

    def compute(self) -> dict:
        """`accuracy` ×100."""
        return {"accuracy": self._overall()}


def table_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """`records`, plus Parquet files (a Hugging Face dataset's shards) read with pyarrow."""
    path = Path(path)
    if path.suffix != ".parquet":
        yield from records(path)
        return
    import pyarrow.parquet as pq  # a dependency of `datasets`

    yield from enumerate(pq.read_table(path).to_pylist())


def embedded_image(value, folder: Path, stem: str) -> str | Path:
    """A Hugging Face `Image` cell (`{"bytes", "path"}`) written once to `folder/stem<suffix>`;
    a plain string (a path) is returned as it is."""
    if not isinstance(value, Mapping):
        return value
    if not value.get("bytes"):
        return value["path"]
    suffix = Path(value.get("path") or "").suffix or ".png"
    target = folder / f"{stem}{suffix}"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        target.write_bytes(value["bytes"])
    return target
