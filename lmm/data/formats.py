"""Readers: Mantis chat and LLaVA records (json or jsonl) → `Sample`.

One parser reads both formats (they differ only in key names):
- Mantis: `{"id", "images": [path, ...], "conversation": [{"role", "content"}]}`
- LLaVA:  `{"id", "image": path | [path, ...], "conversations": [{"from", "value"}]}`

Markers and images (docs/data.md): the i-th `<image>` marker is the i-th image. A record with
images but no marker gets one marker per image, each followed by a newline, at the start of the
first user turn (what LLaVA and Mantis do). Any other disagreement is an error naming the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmm.data.sample import IMAGE_MARKER, BadRecordError, Media, Part, Sample, Turn

ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(index, record)` from a JSON array file or a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(1024).lstrip()
    if path.suffix == ".jsonl" or not head.startswith(b"["):
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as err:
                        raise BadRecordError(
                            path, f"line {i + 1}", f"invalid JSON ({err})", "fix the line"
                        ) from err
        return
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    yield from enumerate(records)


def _first(record: dict, *keys: str):
    """The value of the first key present and not None (`datasets` fills absent keys with None)."""
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    return None


def _split_markers(text: str, next_index: int) -> tuple[list[Part], int]:
    parts: list[Part] = []
    for k, piece in enumerate(text.split(IMAGE_MARKER)):
        if k > 0:
            parts.append(Media(next_index))
            next_index += 1
        if piece:
            parts.append(piece)
    return parts, next_index


def _resolve(rel: str, root: Path, source: Path, record_id: str, allow_outside_root: bool) -> Path:
    path = Path(rel)
    if not allow_outside_root and (path.is_absolute() or ".." in path.parts):
        raise BadRecordError(
            source,
            record_id,
            f"media path {rel!r} is absolute or leaves the data root {root}",
            "use a path relative to the data root, or set allow_outside_root: true in the recipe",
        )
    return path if path.is_absolute() else root / path


def parse_record(
    record: dict,
    *,
    source: str | Path,
    root: str | Path | None = None,
    index: int = 0,
    check_media: bool = True,
    allow_outside_root: bool = False,
) -> Sample:
    """Turn one Mantis or LLaVA chat record into a `Sample`, or raise `BadRecordError`."""
    source = Path(source)
    root = Path(root) if root is not None else source.parent
    record_id = str(record.get("id", f"#{index}"))

    def bad(problem: str, fix: str = "") -> BadRecordError:
        return BadRecordError(source, record_id, problem, fix)

    messages = _first(record, "conversation", "conversations")
    if not isinstance(messages, list) or not messages:
        raise bad("no conversation", "give a non-empty 'conversation' or 'conversations' list")
    images = _first(record, "images", "image") or []
    if isinstance(images, (str, dict)):
        images = [images]
    paths = []
    for item in images:
        rel = item.get("path") if isinstance(item, dict) else item
        if not isinstance(rel, str):
            raise bad(f"image entry {item!r} is not a path")
        paths.append(_resolve(rel, root, source, record_id, allow_outside_root))

    turns: list[Turn] = []
    n_markers = 0
    for k, msg in enumerate(messages):
        raw_role = _first(msg, "role", "from")
        role = ROLE_NAMES.get(str(raw_role).lower())
        text = _first(msg, "content", "value")
        if role is None:
            raise bad(
                f"turn {k} has unknown role {raw_role!r}",
                f"use one of {sorted(ROLE_NAMES)}",
            )
        if not isinstance(text, str):
            raise bad(f"turn {k} has no text content")
        parts, n_markers = _split_markers(text, n_markers)
        if role != "user" and any(isinstance(p, Media) for p in parts):
            raise bad(f"turn {k} ({role}) holds an {IMAGE_MARKER} marker; only user turns may")
        turns.append(Turn(role, parts))

    if n_markers == 0 and paths:
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is None:
            raise bad("has images but no user turn to place them in")
        first_user.parts[:0] = [p for i in range(len(paths)) for p in (Media(i), "\n")]
    elif n_markers != len(paths):
        raise bad(
            f"{n_markers} {IMAGE_MARKER} markers but {len(paths)} images",
            f"give one {IMAGE_MARKER} marker per image, or none to place all images first",
        )
    if check_media:
        for i, path in enumerate(paths):
            if not path.is_file():
                raise bad(f"image {i} not found: {path}", "check the path and the data root")
    meta = {k: record[k] for k in ("task", "source", "category") if k in record}
    return Sample(record_id, turns, paths, source=str(source), meta=meta)


def iter_samples(
    records: Iterable[tuple[int, dict]],
    *,
    source: str | Path,
    root: str | Path | None = None,
    check_media: bool = True,
    allow_outside_root: bool = False,
) -> Iterator[Sample | BadRecordError]:
    """Parse records one by one, yielding the error of a bad record in its place."""
    for i, rec in records:
        try:
            yield parse_record(
                rec,
                source=source,
                root=root,
                index=i,
                check_media=check_media,
                allow_outside_root=allow_outside_root,
            )
        except BadRecordError as err:
            yield err


def stream_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Records of a json/jsonl file streamed with `datasets` (for data larger than memory)."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train", streaming=True)
    yield from enumerate(dataset)


def load_samples(
    path: str | Path,
    *,
    root: str | Path | None = None,
    check_media: bool = True,
    allow_outside_root: bool = False,
) -> list[Sample]:
    """Read every record of a json/jsonl chat file; the first bad record raises."""
    return [
        parse_record(
            rec,
            source=path,
            root=root,
            index=i,
            check_media=check_media,
            allow_outside_root=allow_outside_root,
        )
        for i, rec in read_records(path)
    ]
