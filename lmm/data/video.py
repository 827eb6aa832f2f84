"""Videos as lists of frames: which frames to sample, and decoding only those (decord or PyAV)."""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from lmm.data import media
from lmm.data.sample import BadRecordError
from lmm.utils.logging import get_logger

log = get_logger(__name__)

Strategy = Literal["uniform", "fps", "segments"]
Backend = Literal["auto", "decord", "pyav"]
STRATEGIES: tuple[str, ...] = ("uniform", "fps", "segments")
BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav")


def _check_sampling(strategy: str, max_frames: int, fps: float | None) -> None:
    """Raise ValueError for sampling arguments that no video could satisfy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be an int >= 1, got {max_frames!r}")
    if strategy == "fps":
        if fps is None or not fps > 0:
            raise ValueError(
                f"strategy='fps' needs fps > 0 (frames per second to keep), got {fps!r}"
            )
    elif fps is not None:
        # An ignored fps would silently change what the model sees; make the choice explicit.
        raise ValueError(f"fps={fps} is used only by strategy='fps', got strategy={strategy!r}")


def _uniform(n: int, k: int) -> list[int]:
    """`k` indices evenly spaced over `0..n-1`, both ends included, rounded to nearest."""
    k = min(k, n)
    return [int(i) for i in np.linspace(0, n - 1, k).round()]


def sample_indices(
    num_frames: int,
    avg_fps: float,
    *,
    strategy: Strategy = "uniform",
    max_frames: int = 8,
    fps: float | None = None,
) -> list[int]:
    """Frame indices to decode, sorted and deterministic, at most `max_frames` of them.

    uniform (LLaVA-OneVision, `process_video_with_decord` in LLaVA-NeXT): k = min(max_frames,
        num_frames) indices `np.linspace(0, num_frames - 1, k).round()`; first and last frame
        included. (LLaVA-NeXT truncates with `dtype=int`; we round to nearest, numpy's
        half-to-even.) 30 frames, 8 → [0, 4, 8, 12, 17, 21, 25, 29].
    fps (Mantis video loader): one frame every `ceil(avg_fps / fps)` frames starting at 0; when
        that gives more than max_frames, keep max_frames of them with the uniform rule above.
        60 frames at 30 fps, fps=2 → step 15 → [0, 15, 30, 45].
    segments (MVBench `get_index`, TSN test mode): split `[0, num_frames)` into k = min(max_frames,
        num_frames) equal segments and take each one's midpoint, `int(start + (end - start) / 2)`.
        (MVBench spans `[0, num_frames - 1]`; we span all frames so segments are equal.)
        30 frames, 8 → [1, 5, 9, 13, 16, 20, 24, 28].
    """
    _check_sampling(strategy, max_frames, fps)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if strategy == "uniform":
        return _uniform(num_frames, max_frames)
    if strategy == "fps":
        assert fps is not None  # checked above; for the type checker
        if not avg_fps > 0:
            raise ValueError(f"strategy='fps' needs the video's avg_fps > 0, got {avg_fps!r}")
        step = max(1, math.ceil(avg_fps / fps))
        candidates = list(range(0, num_frames, step))
        if len(candidates) <= max_frames:
            return candidates
        return [candidates[i] for i in _uniform(len(candidates), max_frames)]
    k = min(max_frames, num_frames)
    seg = num_frames / k
    return [int(i * seg + seg / 2) for i in range(k)]


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says about its (first) video stream."""

    num_frames: int
    avg_fps: float
    width: int
    height: int


class VideoError(ValueError):
    """A video file that cannot be opened or decoded as asked (the message names the file)."""


def _check_indices(indices: Sequence[int], num_frames: int, path: Path, header: int) -> list[int]:
    """Indices as ints; VideoError when one is past the frames the file actually holds."""
    out = [int(i) for i in indices]
    if not out:
        raise ValueError("indices is empty: ask for at least one frame")
    if min(out) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(out)}")
    if max(out) >= num_frames:
        said = f" (its header says {header})" if header and header != num_frames else ""
        raise VideoError(
            f"{path}: frame {max(out)} asked but only {num_frames} frames can be read{said}; "
            "the file looks truncated"
        )
    return out


class VideoReader:
    """Decode only the sampled frames: PyAV, each needed GOP once; decord when PyAV fails on a file."""

    def __init__(self, backend: Backend = "auto", num_threads: int | None = None):
        """Choose the decoder.

        Args:
            backend: `auto` tries PyAV then decord (when importable) per file; `pyav` or
                `decord` use only that one. PyAV decodes each needed GOP once in frame order
                (see `_decode_runs`): 1.5x decord's per-frame seeks at GOP 60 and 6x on
                libx264's default GOP (docs/benchmarks.md, video), identical pixels.
            num_threads: threads per read. PyAV shares the GOP spans a read needs among them
                (each span starts at a keyframe: they decode independently, each thread from
                its own opening of the file); decord and PyAV's decode-from-the-start path
                use FFmpeg's frame threads. None: 1 inside a DataLoader worker (the workers
                already decode different videos in parallel), else one per core (up to 4);
                0: one per core.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.num_threads = num_threads
        self._decord: Any = None
        if backend in ("auto", "decord"):
            try:
                import decord
            except ImportError as e:
                if backend == "decord":
                    # decord has wheels only for x86_64 Linux/Windows (none for aarch64, macOS arm64)
                    raise ImportError(
                        "backend='decord' but decord is not installed; `pip install decord` "
                        "(x86_64 only) or use backend='pyav'"
                    ) from e
            else:
                self._decord = decord

    def threads(self) -> int:
        """The threads a read uses now (`num_threads`, resolved)."""
        if self.num_threads is None:
            if torch.utils.data.get_worker_info() is not None:
                return 1
            return min(os.cpu_count() or 1, 4)
        return self.num_threads or os.cpu_count() or 1

    def info(self, path: str | Path) -> VideoInfo:
        """Frame count, average fps and size of the first video stream."""
        return self._run("info", Path(path))

    def read(self, path: str | Path, indices: Sequence[int]) -> np.ndarray:
        """The frames at `indices`, in the order asked (repeats allowed): `[k, H, W, 3]` uint8 RGB."""
        return self._run("read", Path(path), indices)

    def _run(self, op: str, path: Path, *args: Any) -> Any:
        """Call the PyAV implementation of `op`, falling back to decord under `auto`."""
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        _refuse_images(path)
        if self.backend == "decord":
            return self._run_decord(op, path, *args)
        try:
            return getattr(self, f"_pyav_{op}")(path, *args)
        except VideoError as e:
            if self._decord is None:
                raise
            log.debug("PyAV failed on %s (%s); trying decord", path, e)
            try:
                return self._run_decord(op, path, *args)
            except VideoError:
                raise e from None  # PyAV's message says more (truncated, no stream, ...)

    def _run_decord(self, op: str, path: Path, *args: Any) -> Any:
        """Call the decord implementation of `op`; its own errors become VideoError."""
        try:
            return getattr(self, f"_decord_{op}")(path, *args)
        except (VideoError, ValueError, TypeError):
            raise  # a bad file we named, or bad arguments
        except Exception as e:
            # decord raises its own DECORDError or RuntimeError for anything it cannot decode
            raise VideoError(f"{path}: decord cannot read it: {_first_line(e)}") from e

    # decord ----------------------------------------------------------------------------------

    def _decord_open(self, path: Path) -> Any:
        return self._decord.VideoReader(
            str(path), ctx=self._decord.cpu(0), num_threads=self.threads()
        )

    @staticmethod
    def _to_numpy(batch: Any) -> np.ndarray:
        # decord's output type follows a global bridge (numpy, torch, ...) someone may have set
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)

    def _decord_info(self, path: Path) -> VideoInfo:
        vr = self._decord_open(path)
        # decord exposes no frame size without decoding; frame 0 is a keyframe, so this is cheap
        h, w = self._to_numpy(vr.get_batch([0])).shape[1:3]
        return VideoInfo(len(vr), float(vr.get_avg_fps()), int(w), int(h))

    def _decord_read(self, path: Path, indices: Sequence[int]) -> np.ndarray:
        vr = self._decord_open(path)
        idx = _check_indices(indices, len(vr), path, len(vr))
        return self._to_numpy(vr.get_batch(idx))  # decord seeks to keyframes itself

    # PyAV ------------------------------------------------------------------------------------

    def _pyav_open(self, path: Path, threads: int = 1) -> Any:
        import av

        try:
            container = av.open(str(path))
        except av.FFmpegError as e:
            raise VideoError(f"{path}: not a readable video ({_first_line(e)})") from e
        if not container.streams.video:
            container.close()
            raise VideoError(f"{path}: the file has no video stream")
        fmt = container.format.name
        if fmt == "image2" or fmt.endswith("_pipe"):  # FFmpeg's still-image demuxers
            container.close()
            raise VideoError(
                f"{path}: FFmpeg reads it as a still image ({fmt}), not a video; give it as "
                "an image (the record's `image` field) or fix the file"
            )
        stream = container.streams.video[0]
        # frame and slice threads (FFmpeg picks what the codec supports)
        stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        return container

    def _pyav_info(self, path: Path) -> VideoInfo:
        import av

        with self._pyav_open(path) as container:
            stream = container.streams.video[0]
            num_frames = stream.frames
            if not num_frames:
                # Some containers (webm, mkv, raw streams) leave the count at 0: count packets,
                # which demuxes without decoding (one packet per frame for video codecs).
                try:
                    num_frames = sum(p.size > 0 for p in container.demux(stream))
                except av.FFmpegError as e:
                    raise VideoError(f"{path}: cannot demux ({_first_line(e)})") from e
            rate = stream.average_rate or stream.guessed_rate or 0
            ctx = stream.codec_context
            return VideoInfo(int(num_frames), float(rate), int(ctx.width), int(ctx.height))

    def _pyav_read(self, path: Path, indices: Sequence[int]) -> np.ndarray:
        import av

        threads = self.threads()
        # the openings the other threads decode from, started now, beside the demux pass below
        spares = [_pool(threads).submit(self._pyav_open, path) for _ in range(threads - 1)]
        try:
            with self._pyav_open(path) as container:
                stream = container.streams.video[0]
                # One demux pass (no decoding) lists the packets in decode order with their
                # pts, keyframe flag and whether another frame may reference them; frame i is
                # the i-th smallest pts, as decord numbers them.
                nal_length = _avcc_nal_length(stream.codec_context)
                packets = [
                    _Packet(p.pts, p.is_keyframe, _h264_disposable(p, nal_length))
                    for p in container.demux(stream)
                    if p.size > 0
                ]
                if all(p.pts is not None for p in packets) and len({p.pts for p in packets}) == len(
                    packets
                ):
                    idx = _check_indices(indices, len(packets), path, stream.frames)
                    try:
                        frames = self._pyav_spans(
                            container, path, packets, sorted(set(idx)), spares
                        )
                    except _SeekMissed:
                        log.debug("%s: a seek did not land on its keyframe; decoding it all", path)
                    else:
                        return np.stack([frames[i] for i in idx])
            # No timestamps to seek by (e.g. raw .h264): decode from the start, counting frames.
            with self._pyav_open(path, threads=self.threads()) as container:
                return self._pyav_read_sequential(container, path, indices)
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed ({_first_line(e)})") from e
        finally:
            for spare in spares:  # the openings no thread took
                if spare.exception() is None:
                    spare.result().close()

    def _pyav_spans(
        self,
        container: Any,
        path: Path,
        packets: list[_Packet],
        wanted: list[int],
        spares: list[Future],
    ) -> dict[int, np.ndarray]:
        """The `wanted` frames by `_decode_runs`; with several threads, the spans (independent:
        each starts at a keyframe) are shared among them, each thread decoding its own spans in
        file order from its own opening of the file (`spares`, opened while the packets were
        listed; a thread that takes one closes it), as one would."""
        spans = _plan_runs(packets, wanted)
        if not spares or len(spans) == 1:
            return _decode_runs(container, path, packets, wanted)
        order = sorted(range(len(packets)), key=lambda q: packets[q].pts)
        asked = {order[i] for i in wanted}
        groups: list[list[int]] = [[] for _ in range(min(len(spares) + 1, len(spans)))]
        load = [0] * len(groups)
        # the packets each span decodes (disposable ones only when asked for), largest first
        cost = {
            (start, end): sum(
                1 for q in range(start, end + 1) if not packets[q].disposable or q in asked
            )
            for start, end in spans
        }
        for span in sorted(spans, key=cost.__getitem__, reverse=True):
            g = load.index(min(load))
            load[g] += cost[span]
            groups[g] += [i for i in wanted if span[0] <= order[i] <= span[1]]
        if sum(load) < PARALLEL_GAIN * max(load):
            # one long span dominates (e.g. a single 250-frame GOP): threads would not help
            return _decode_runs(container, path, packets, wanted)

        def run(opening: Future, group: list[int]) -> dict[int, np.ndarray]:
            with opening.result() as own:
                return _decode_runs(own, path, packets, sorted(group))

        pool = _pool(len(spares) + 1)  # the pool that opens them: its tasks run in order
        taken = [spares.pop() for _ in groups[1:]]
        pending = [
            pool.submit(run, opening, group)
            for opening, group in zip(taken, groups[1:], strict=True)
        ]
        out = _decode_runs(container, path, packets, sorted(groups[0]))  # this thread too
        for part in pending:
            out.update(part.result())
        return out

    @staticmethod
    def _pyav_read_sequential(container: Any, path: Path, indices: Sequence[int]) -> np.ndarray:
        """Decode from the start, keeping the frames at `indices`."""
        idx = [int(i) for i in indices]
        if not idx or min(idx) < 0:
            raise ValueError(f"indices must be non-empty and >= 0, got {idx}")
        wanted = set(idx)
        out: dict[int, np.ndarray] = {}
        count = 0
        to_rgb = _RGB()
        for frame in container.decode(container.streams.video[0]):
            if count in wanted:
                out[count] = to_rgb(frame)
                if len(out) == len(wanted):
                    break
            count += 1
        if len(out) < len(wanted):
            raise VideoError(
                f"{path}: frame {max(idx)} asked but only {count} frames decode; "
                "the file looks truncated"
            )
        return np.stack([out[i] for i in idx])


@dataclass(frozen=True)
class _Packet:
    """One compressed frame as the demuxer gives it, in decode order."""

    pts: int
    keyframe: bool
    disposable: bool  # no other frame references it: skippable unless it is itself asked for


class _RGB:
    """Frames to `[H, W, 3]` uint8 RGB, the pixels of `frame.to_ndarray(format="rgb24")`.

    One swscale context serves every frame of a read: `to_ndarray` builds a new context per
    frame, with a thread pool of its own, which costs ~3 ms a frame, more than decoding one.
    """

    def __init__(self) -> None:
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()

    def __call__(self, frame: Any) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()


class _SeekMissed(Exception):
    """A seek landed after the keyframe it aimed at; the caller decodes from the start."""


def _avcc_nal_length(codec_context: Any) -> int | None:
    """Bytes of each NAL unit's length prefix for H.264 in MP4/MKV (avcC), else None."""
    extradata = codec_context.extradata
    if codec_context.name != "h264" or not extradata or extradata[0] != 1 or len(extradata) < 5:
        return None  # not H.264, or Annex B start codes: no packet is skipped
    return (extradata[4] & 3) + 1


def _h264_disposable(packet: Any, nal_length: int | None) -> bool:
    """True when the packet's picture has nal_ref_idc 0: no later picture is decoded from it."""
    if nal_length is None:
        return False
    data = memoryview(packet)
    pos = 0
    while pos + nal_length < len(data):
        size = int.from_bytes(data[pos : pos + nal_length], "big")
        header = data[pos + nal_length]
        if header & 0x1F in (1, 5):  # the first coded slice: non-IDR or IDR
            return header & 0x60 == 0
        pos += nal_length + size
    return False  # no slice found: keep the packet


def _plan_runs(packets: list[_Packet], wanted: list[int]) -> list[tuple[int, int]]:
    """Decode-order spans `(start, end)` that together decode the `wanted` frames (sorted).

    A span starts at the keyframe before a wanted frame and ends at the last wanted frame
    decoded from it; a keyframe inside the previous span or right after it joins that span
    (decoding on costs nothing extra), so spans are disjoint and in file order and no packet
    is decoded twice.
    """
    order = sorted(range(len(packets)), key=lambda p: packets[p].pts)  # frame i -> decode pos
    keys = [p for p, packet in enumerate(packets) if packet.keyframe]
    runs: dict[int, int] = {}  # start decode position -> last decode position
    for i in wanted:
        pos = order[i]
        k = bisect.bisect_right(keys, pos) - 1
        # a leading frame (shown before its keyframe, open GOP) needs the previous GOP
        while k >= 0 and packets[keys[k]].pts > packets[pos].pts:
            k -= 1
        start = keys[k] if k >= 0 else 0
        runs[start] = max(runs.get(start, pos), pos)
    merged: list[tuple[int, int]] = []
    for start, end in sorted(runs.items()):
        if merged and start <= merged[-1][1] + 1:  # inside or right after: decode on
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _decode_runs(
    container: Any, path: Path, packets: list[_Packet], wanted: list[int]
) -> dict[int, np.ndarray]:
    """Decode the `wanted` (sorted, unique) frames, each needed GOP once and in frame order.

    The spans of `_plan_runs` are decoded after one seek each; inside a span, disposable
    frames that are not wanted are not decoded. Pixels equal a full decode's: every frame a
    wanted frame refers to is decoded.
    """
    stream = container.streams.video[0]
    merged = _plan_runs(packets, wanted)
    order = sorted(range(len(packets)), key=lambda p: packets[p].pts)
    position_of = {packet.pts: p for p, packet in enumerate(packets)}
    index_of = {packets[order[i]].pts: i for i in wanted}
    out: dict[int, np.ndarray] = {}

    to_rgb = _RGB()

    def keep(frames: Any) -> None:
        for frame in frames:
            i = index_of.get(frame.pts)
            if i is not None and i not in out:
                out[i] = to_rgb(frame)

    for start, end in merged:
        container.seek(packets[start].pts, stream=stream, backward=True, any_frame=False)
        started = False
        for packet in container.demux(stream):
            pos = position_of.get(packet.pts) if packet.size > 0 else None
            if pos is None or pos < start:
                continue  # the seek landed before our keyframe: demux on to it
            if not started and pos != start:
                raise _SeekMissed
            started = True
            if pos > end:
                break
            if packet.pts not in index_of and packets[pos].disposable:
                continue
            keep(stream.codec_context.decode(packet))
        keep(stream.codec_context.decode(None))  # drain the frames the decoder still holds
        stream.codec_context.flush_buffers()
    missing = [i for i in wanted if i not in out]
    if missing:
        raise VideoError(
            f"{path}: frame {missing[0]} of {len(packets)} could not be decoded; "
            "the file looks truncated or damaged"
        )
    return out


# Spans are shared among threads only when that could make the read this much faster (the
# total decoding over the busiest thread's share): each extra thread opens the file again.
PARALLEL_GAIN = 1.5


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """A shared pool of `threads` decoding threads (PyAV releases the GIL while it decodes)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="lmm-video")


def _refuse_images(path: Path) -> None:
    """VideoError when the content is a still image: a PNG named `.mp4` is not a 1-frame video.

    GIF passes: animated GIFs are videos in some datasets (TGIF-QA).
    """
    kind = media.sniff_media(path)
    if kind is not None and not kind[1] and kind[0] != "a GIF image":
        raise VideoError(
            f"{path}: the file is {kind[0]}, not a video; give it as an image (the record's "
            "`image` field) or fix the file"
        )


def _first_line(e: BaseException) -> str:
    """An exception's message, first line only (decord appends C++ stack traces)."""
    if getattr(e, "strerror", None):  # FFmpeg errors: the reason without errno and path
        return str(e.strerror)  # type: ignore[attr-defined]
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_video(
    path: str | Path,
    *,
    max_frames: int = 8,
    fps: float | None = None,
    strategy: Strategy = "uniform",
    min_frames: int = 1,
    reader: VideoReader | None = None,
    source: str | Path = "<memory>",
    record_id: str = "?",
) -> list[Image.Image]:
    """Sample a video's frames (see `sample_indices`) as RGB images; a bad file raises BadRecordError."""
    _check_sampling(strategy, max_frames, fps)
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    path = Path(path)
    if not path.is_file():
        raise BadRecordError(
            source,
            record_id,
            f"video file {str(path)!r} not found",
            "fix the path or drop the record",
        )
    reader = reader if reader is not None else VideoReader()
    reencode = (
        "re-encode it (ffmpeg -i in.mp4 -c:v libx264 out.mp4), re-download it or drop the record"
    )
    try:
        info = reader.info(path)
    except VideoError as e:
        raise BadRecordError(source, record_id, f"cannot read video: {e}", reencode) from e
    if strategy == "fps" and not info.avg_fps > 0:
        raise BadRecordError(
            source,
            record_id,
            f"video {path} has no frame rate for strategy='fps'",
            "use strategy='uniform' or re-encode the file with a frame rate",
        )
    if info.num_frames < 1:
        raise BadRecordError(source, record_id, f"video {path} has no frames", reencode)
    indices = sample_indices(
        info.num_frames, info.avg_fps, strategy=strategy, max_frames=max_frames, fps=fps
    )
    _check_frame_budget(info, len(indices), path, source, record_id)
    if len(indices) < min_frames:
        if len(indices) == info.num_frames:
            problem = f"video {path} has {info.num_frames} frames but min_frames={min_frames}"
        else:
            problem = (
                f"video {path} has {info.num_frames} frames, of which strategy={strategy!r} "
                f"(fps={fps}, max_frames={max_frames}) samples {len(indices)}, "
                f"but min_frames={min_frames}"
            )
        raise BadRecordError(
            source, record_id, problem, "drop the record, or lower min_frames / raise fps"
        )
    try:
        frames = reader.read(path, indices)  # [k, H, W, 3] uint8
    except VideoError as e:
        raise BadRecordError(source, record_id, f"cannot decode video: {e}", reencode) from e
    except MemoryError as e:
        raise BadRecordError(
            source,
            record_id,
            f"out of memory decoding {len(indices)} frames of {info.width}x{info.height} "
            f"from video {path}",
            "sample fewer frames, resize the video or use fewer workers",
        ) from e
    return [Image.fromarray(f) for f in frames]


def _check_frame_budget(
    info: VideoInfo, k: int, path: Path, source: str | Path, record_id: str
) -> None:
    """BadRecordError when the header's frame size breaks the image budgets of lmm.data.media
    (pixels, side, decoded bytes for `k` RGB frames), before any frame is decoded."""
    w, h = info.width, info.height
    if w * h > media.MAX_IMAGE_PIXELS or max(w, h) > media.MAX_IMAGE_SIDE:
        raise BadRecordError(
            source,
            record_id,
            f"video {path} has {w}x{h} frames, more than the limits of "
            f"{media.MAX_IMAGE_PIXELS} pixels and {media.MAX_IMAGE_SIDE} per side",
            "resize the video, or raise lmm.data.media.MAX_IMAGE_PIXELS / MAX_IMAGE_SIDE",
        )
    need = k * media.decode_bytes("RGB", w, h)
    if need > media.MAX_DECODE_BYTES:
        raise BadRecordError(
            source,
            record_id,
            f"{k} frames of {w}x{h} from video {path} take {need} bytes to decode, more than "
            f"the limit of {media.MAX_DECODE_BYTES}",
            "sample fewer frames, resize the video or raise lmm.data.media.MAX_DECODE_BYTES",
        )
