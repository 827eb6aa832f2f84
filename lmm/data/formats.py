"""Readers: Mantis chat and LLaVA records (json or jsonl) → `Sample`.

One parser reads both formats (they differ only in key names):
- Mantis: `{"id", "images": [path, ...], "conversation": [{"role", "content"}]}`
- LLaVA:  `{"id", "image": path | [path, ...], "conversations": [{"from", "value"}]}`

- videos (Mantis `chat_video`, LLaVA `video`): `{"video": path, ...}`; its frames are the
  media of one `<video>` (or `<image>`) marker
- Mantis `classification` (VideoScore): `{"id", "images", "prompt", "labels": {name: score}}`

Markers and images (docs/data.md): the i-th `<image>` marker is the i-th image. A record with
images but no marker gets one marker per image, each followed by a newline, at the start of the
first user turn; `Preprocessing.unmarked_media` and `marker_placement` give the seeds' other
policies. Any other disagreement is an error naming the record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmm.data.policy import DEFAULT, Preprocessing
from lmm.data.sample import IMAGE_MARKER, BadRecordError, Media, Part, Sample, Turn, VideoRef

VIDEO_MARKER = "<video>"


@dataclass(frozen=True)
class VideoOptions:
    """How the frames of a record's video are sampled (see lmm.data.video.sample_indices)."""

    max_frames: int = 8
    fps: float | None = None
    strategy: str = "uniform"
    min_frames: int = 1


ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def read_records(path: str | Path) -> Iterator[tuple[int, dict | BadRecordError]]:
    """Yield `(index, record)` from a JSON array file, a JSON-lines file, or a `.json` file
    holding one record object. A leading UTF-8 byte-order mark is ignored.

    In a JSON-lines file a line that is not UTF-8 or not JSON yields a `BadRecordError` in
    place of its record (so a run can skip it), with its line number; a `.json` file that is
    broken JSON as a whole raises a `BadRecordError` naming the file and the position. Lines
    are read one at a time, so a JSON-lines file is streamed, never held in memory whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(1024).removeprefix(_BOM).lstrip()
    lines = path.suffix == ".jsonl" or not head.startswith((b"[", b"{"))
    if lines or (head.startswith(b"{") and _first_line_is_json(path)):
        yield from _json_lines(path)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadRecordError(
            path, "(whole file)", f"not UTF-8 at byte {err.start}", "re-encode the file as UTF-8"
        ) from err
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        if head.startswith(b"{"):  # not one object: JSON lines (one object per line)
            yield from _json_lines(path)
            return
        raise BadRecordError(
            path,
            "(whole file)",
            f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
            "fix the file there (a trailing comma after the last element is not JSON), "
            "or write one record per line as JSON lines (.jsonl)",
        ) from err
    if isinstance(records, dict):  # a file holding one record
        yield 0, records
        return
    if not isinstance(records, list):
        raise ValueError(
            f"{path}: expected a JSON array of records, got a JSON {type(records).__name__}"
        )
    yield from enumerate(records)


_BOM = b"\xef\xbb\xbf"


def _first_line_is_json(path: Path) -> bool:
    """Whether the first line is a whole JSON value: JSON lines, not one object over many lines."""
    with path.open("rb") as f:
        first = f.readline().removeprefix(_BOM)
    try:
        json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _json_lines(path: Path) -> Iterator[tuple[int, dict | BadRecordError]]:
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            if i == 0:
                raw = raw.removeprefix(_BOM)
            if raw.strip():
                yield i, _json_line(raw, path, i)


def _json_line(raw: bytes, path: Path, i: int) -> dict | BadRecordError:
    where = f"line {i + 1}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return BadRecordError(
            path, where, f"not UTF-8 text (byte {err.start} of the line)", "re-encode as UTF-8"
        )
    except json.JSONDecodeError as err:
        return BadRecordError(path, where, f"invalid JSON ({err})", "fix the line")
    if not isinstance(record, dict):
        return BadRecordError(path, where, f"a JSON {type(record).__name__}, not an object")
    return record


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
    """`root / rel`; unless `allow_outside_root`, a BadRecordError when it leaves the root: an
    absolute path, a `..`, or a symlink (any part of it) pointing outside the root."""
    path = Path(rel)
    if allow_outside_root:
        return path if path.is_absolute() else root / path
    fix = "use a path relative to the data root, or set allow_outside_root: true in the recipe"
    if path.is_absolute() or ".." in path.parts:
        raise BadRecordError(
            source, record_id, f"media path {rel!r} is absolute or leaves the data root {root}", fix
        )
    full = root / path
    # Symlinks are resolved before the check: a link inside the root may point anywhere.
    real = full.resolve()
    if not real.is_relative_to(root.resolve()):
        raise BadRecordError(
            source,
            record_id,
            f"media path {rel!r} is a symlink to {real}, outside the data root {root}",
            fix,
        )
    return full


def parse_record(
    record: dict,
    *,
    source: str | Path,
    root: str | Path | None = None,
    index: int = 0,
    check_media: bool = True,
    allow_outside_root: bool = False,
    video: VideoOptions | None = None,
    labels: Sequence[str] | None = None,
    policy: Preprocessing | None = None,
) -> Sample:
    """Turn one Mantis or LLaVA record (chat, chat_video or classification) into a `Sample`.

    `policy` gives the marker placement and the handling of unmarked media (lmm's default:
    markers where written, unmarked images first). Raises `BadRecordError` naming the file,
    the record and the fix.
    """
    policy = policy or DEFAULT
    source = Path(source)
    root = Path(root) if root is not None else source.parent
    record_id = str(record.get("id", f"#{index}"))

    def bad(problem: str, fix: str = "") -> BadRecordError:
        return BadRecordError(source, record_id, problem, fix)

    def resolve(rel: str) -> Path:
        return _resolve(rel, root, source, record_id, allow_outside_root)

    scores = record.get("labels")
    if isinstance(scores, dict) and _first(record, "conversation", "conversations") is None:
        return _classification(record, record_id, source, resolve, bad, check_media, labels)

    messages = _first(record, "conversation", "conversations")
    if not isinstance(messages, list) or not messages:
        raise bad("empty conversation", "give a non-empty 'conversation' or 'conversations' list")
    media: list[Path | VideoRef] = [resolve(rel) for rel in _image_paths(record, bad)]
    if len(media) < policy.min_images:
        raise bad(
            f"{len(media)} images, fewer than this recipe's seed needs (min_images="
            f"{policy.min_images})",
            "drop the record, or lower preprocessing.min_images",
        )
    if policy.max_images is not None and len(media) > policy.max_images:
        raise bad(
            f"{len(media)} images, more than this recipe's seed reads (max_images="
            f"{policy.max_images}: its reader takes one image path per record)",
            "split the record, or raise preprocessing.max_images",
        )
    if record.get("video") is not None:
        if media:
            raise bad("has both images and a video", "split it into two records")
        if not isinstance(record["video"], str):
            raise bad(f"video entry {record['video']!r} is not a path")
        options = video or VideoOptions()
        media = [VideoRef(resolve(record["video"]), **options.__dict__)]

    turns: list[Turn] = []
    n_markers = 0
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad(f"turn {k} is not an object with a role and content")
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
        if role != "system" and not text.strip():
            raise bad(
                f"turn {k} ({role}) is empty",
                "give the turn its text or drop it (a file to answer may end with the user turn)",
            )
        if media and isinstance(media[0], VideoRef):
            text = text.replace(VIDEO_MARKER, IMAGE_MARKER)
        if media:  # the seeds move markers only in records that have media
            text = _place_marker(text, policy.marker_placement)
        parts, n_markers = _split_markers(text, n_markers)
        if role == "system" and policy.system_turn == "drop":
            continue
        if role == "assistant" and not any(t.role != "system" for t in turns):
            if policy.leading_assistant == "drop":  # the seeds skip a first non-human turn
                continue
        if role == "system" and policy.system_turn == "refuse":
            raise bad(
                f"turn {k} is a system turn, which this recipe's seed code cannot read (its "
                "reader knows only human/gpt roles and fails on the record)",
                "drop the system turn, or set preprocessing.system_turn: use",
            )
        if role != "user" and any(isinstance(p, Media) for p in parts):
            raise bad(f"turn {k} ({role}) holds an {IMAGE_MARKER} marker; only user turns may")
        turns.append(Turn(role, parts))

    if n_markers == 0 and media and policy.unmarked_media == "refuse":
        raise bad(
            f"{len(media)} images but no {IMAGE_MARKER} marker, which this recipe's seed refuses",
            f"give one {IMAGE_MARKER} marker per image",
        )
    if n_markers == 0 and media and policy.unmarked_media == "drop":
        media = []  # LLaVA's code loads such images but never places them: the model sees none
    _place_media(turns, n_markers, len(media), bad, policy.unmarked_media)
    if check_media:
        _check_files(media, bad)
    meta = {k: record[k] for k in ("task", "source", "category") if k in record}
    return Sample(record_id, turns, media, source=str(source), meta=meta)


def _image_paths(record: dict, bad) -> list[str]:
    images = _first(record, "images", "image") or []
    if isinstance(images, (str, dict)):
        images = [images]
    if not isinstance(images, list):
        raise bad(f"images {images!r} is not a list of paths")
    out = []
    for item in images:
        rel = item.get("path") if isinstance(item, dict) else item
        if not isinstance(rel, str):
            raise bad(f"image entry {item!r} is not a path")
        out.append(rel)
    return out


def _place_marker(text: str, placement: str) -> str:
    """A turn's text with its marker moved as LLaVA's `preprocess_multimodal` moves it.

    `turn_start` (LLaVA-1.5): a turn holding markers loses them all, is stripped, and starts
    with one `<image>\n`. `turn_start_unless_first` (LLaVA-NeXT): only a turn with exactly one
    marker that does not already start it.
    """
    n = text.count(IMAGE_MARKER)
    if placement == "keep" or n == 0:
        return text
    if placement == "turn_start_unless_first" and (n != 1 or text.startswith(IMAGE_MARKER)):
        return text
    return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


def _place_media(turns: list[Turn], n_markers: int, n_media: int, bad, unmarked: str) -> None:
    """Apply the marker policy (module docstring): place unmarked media first, else counts must agree.

    With `prepend` (Mantis) counts need not agree: missing markers are prepended to the first
    user turn (they take the first images) and markers beyond the images are removed.
    """
    if unmarked == "prepend" and n_media and 0 < n_markers != n_media:
        if n_markers > n_media:  # MLlavaProcessor keeps the first n_media markers
            for turn in turns:
                turn.parts = [
                    p for p in turn.parts if not (isinstance(p, Media) and p.index >= n_media)
                ]
            return
        extra = n_media - n_markers
        for turn in turns:
            turn.parts = [Media(p.index + extra) if isinstance(p, Media) else p for p in turn.parts]
        first_user = next(t for t in turns if t.role == "user")
        first_user.parts[:0] = [Media(i) for i in range(extra)]
        return
    if n_markers == 0 and n_media:
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is None:
            raise bad("has media but no user turn to place them in")
        after = ("\n",) if unmarked == "newline" else ()
        first_user.parts[:0] = [p for i in range(n_media) for p in (Media(i), *after)]
    elif n_markers != n_media:
        raise bad(
            f"{n_markers} {IMAGE_MARKER} markers but {n_media} images",
            f"give one {IMAGE_MARKER} marker per image, or none to place all images first",
        )


def _check_files(media: Sequence[Path | VideoRef], bad) -> None:
    for i, item in enumerate(media):
        path = item.path if isinstance(item, VideoRef) else item
        if not path.is_file():
            kind = "video" if isinstance(item, VideoRef) else f"image {i}"
            raise bad(f"{kind} not found: {path}", "check the path and the data root")


def _classification(record, record_id, source, resolve, bad, check_media, labels) -> Sample:
    """Mantis `classification` (VideoScore): frames + prompt → a target vector of scores.

    As Mantis does, an `<image> ` is appended to the prompt for every frame beyond the
    prompt's own markers. The target follows `labels` (the declared order), else the
    record's own key order.
    """
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise bad("classification record without a 'prompt' string")
    frames = [resolve(rel) for rel in _image_paths(record, bad)]
    n_markers = prompt.count(IMAGE_MARKER)
    if n_markers > len(frames):
        raise bad(f"{n_markers} {IMAGE_MARKER} markers but {len(frames)} images")
    prompt += f"{IMAGE_MARKER} " * (len(frames) - n_markers)
    parts, _ = _split_markers(prompt, 0)
    scores = record["labels"]
    names = list(labels) if labels is not None else list(scores)
    missing = [n for n in names if n not in scores]
    extra = [n for n in scores if n not in names]
    if missing or extra:
        raise bad(
            f"labels {sorted(scores)} do not match the declared {names} (missing {missing}, "
            f"unexpected {extra})",
            "give every declared label a value, or declare the labels the data has",
        )
    target = [_score(n, scores[n], bad) for n in names]
    if check_media:
        _check_files(frames, bad)
    meta = {"labels": names, **{k: record[k] for k in ("task", "source") if k in record}}
    return Sample(record_id, [Turn("user", parts)], frames, str(source), meta, target)


_FLOAT32_MAX = 3.4028234663852886e38


def _score(name: str, value, bad) -> float:
    """A score label's value: a finite JSON number that float32 holds (targets are float32)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(
            f"label {name!r} is {value!r} ({type(value).__name__}), not a number",
            "write the score as a JSON number, e.g. 3 or 2.5 (not a string or a boolean)",
        )
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise bad(
            f"label {name!r} is {value!r}, not a finite float32 number (the loss would be NaN "
            "or infinite from the first step)",
            "give a finite score, or drop the record",
        )
    return float(value)


def iter_samples(
    records: Iterable[tuple[int, dict]], **options
) -> Iterator[Sample | BadRecordError]:
    """Parse records one by one, `parse_record(record, index=i, **options)` (`source`, `root`,
    `check_media`, ...), yielding the error of a bad record in its place."""
    for i, rec in records:
        if isinstance(rec, BadRecordError):
            yield rec
            continue
        try:
            yield parse_record(rec, index=i, **options)
        except BadRecordError as err:
            yield err


def stream_records(path: str | Path) -> Iterator[tuple[int, dict | BadRecordError]]:
    """Records of a json/jsonl file for data larger than memory.

    A local file is read by `read_records`, which streams JSON lines one line at a time and
    turns a malformed or non-UTF-8 line into a bad record naming its line (`datasets` raised
    at such a line and could not go on); any other path is streamed with `datasets`.
    """
    if Path(path).is_file():
        yield from read_records(path)
        return
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train", streaming=True)
    yield from enumerate(dataset)


def load_samples(path: str | Path, **options) -> list[Sample]:
    """Read every record of a json/jsonl file; the first bad record raises.

    `options` are those of `parse_record` (root, check_media, allow_outside_root, video, labels,
    policy).
    """
    samples = []
    for item in iter_samples(read_records(path), source=path, **options):
        if isinstance(item, BadRecordError):
            raise item
        samples.append(item)
    return samples
