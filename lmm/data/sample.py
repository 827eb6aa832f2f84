"""The canonical sample every reader produces, and the error raised for a bad record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmm.utils.errors import UserError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Media:
    """A media marker inside a turn: points at `Sample.images[index]`."""

    index: int


Part = str | Media


@dataclass(frozen=True)
class VideoRef:
    """A video used as frames: one media marker becomes every sampled frame (see lmm.data.video)."""

    path: Path
    max_frames: int = 8
    fps: float | None = None  # None: `max_frames` frames spread uniformly
    strategy: str = "uniform"  # uniform | fps | segments
    min_frames: int = 1

    @property
    def sampling(self) -> dict:
        strategy = "fps" if self.fps is not None and self.strategy == "uniform" else self.strategy
        return {"max_frames": self.max_frames, "fps": self.fps, "strategy": strategy}


@dataclass
class Turn:
    """One message of a conversation: text interleaved with media markers."""

    role: Role
    parts: list[Part]

    @property
    def text(self) -> str:
        """The turn's text with each media marker written as `<image>`."""
        return "".join(p if isinstance(p, str) else IMAGE_MARKER for p in self.parts)

    @property
    def num_media(self) -> int:
        return sum(isinstance(p, Media) for p in self.parts)


@dataclass
class Sample:
    """One training or evaluation example, whatever format it was read from."""

    id: str
    turns: list[Turn]
    images: list[Path | VideoRef] = field(default_factory=list)  # media: image paths or videos
    source: str = "<memory>"  # the data file, for error messages
    meta: dict = field(default_factory=dict)
    target: list[float] | None = None  # scores or label targets, in the declared label order

    @property
    def where(self) -> str:
        """`sample 'x' (file)`: the prefix of every message about this sample."""
        return f"sample {self.id!r} ({self.source})"


class BadRecordError(UserError, ValueError):
    """A record that cannot become a correct sample. The message names file, record and fix."""

    def __init__(self, source: str | Path, record_id: str, problem: str, fix: str = ""):
        self.source = str(source)
        self.record_id = record_id
        self.problem = problem
        message = f"sample {record_id!r} ({source}): {problem}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)
