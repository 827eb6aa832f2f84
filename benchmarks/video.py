"""Video frame sampling speed: lmm's sampling path vs decoding every frame vs decord seeking.

Writes a synthetic H.264 mp4 (a red ramp and a moving bar, as in CPU.md section 7) to a temp
dir, samples `--sample` uniform frames from it, and reports frames returned per second of wall
time (median of `--repeats`, the methods interleaved so that a busy moment hits them alike).
Every method opens the file afresh each repeat. `seek_fps` is lmm's own path, `VideoReader()`
as `load_video` uses it outside a DataLoader worker (the GOP spans shared among a thread per
core); `seek_1thread_fps` is the same path with one thread, its setting inside a worker; the
baselines decode with one thread. `identical` says lmm's pixels equal the full decode's. The `*_cpu_ms` keys are process CPU time, which a busy machine inflates
less than wall time. The last line printed is one JSON object.

    python benchmarks/video.py [--frames 300] [--size 224] [--sample 8] [--gop 250] [--texture]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from lmm.data.video import VideoReader, sample_indices


def write_video(
    path: Path, frames: int, size: int, fps: int, gop: int | None, texture: bool = False
) -> None:
    """A synthetic mp4: red ramp over time, a bar moving across, libx264 defaults otherwise.

    texture: pan over a random texture, which decodes about 4x slower, like real footage.
    """
    pattern = np.random.default_rng(0).integers(0, 128, (size, 2 * size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.gop_size = gop
        for i in range(frames):
            img = np.zeros((size, size, 3), np.uint8)  # [H, W, 3]
            if texture:
                img += pattern[:, i % size : i % size + size]
            img[..., 0] = int(255 * i / max(frames - 1, 1))
            x = (i * 3) % (size - 8)
            img[:, x : x + 8] = (40, 200, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def full_decode(path: Path, indices: list[int], fast_rgb: bool = False) -> np.ndarray:
    """The baseline: decode every frame in order with PyAV and keep the sampled ones.

    fast_rgb: convert with one reused swscale context (what lmm does) instead of
    `to_ndarray`'s context per frame, so that only the decoding strategy differs.
    """
    wanted = set(indices)
    out: dict[int, np.ndarray] = {}
    reformatter = VideoReformatter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                if fast_rgb:
                    out[i] = reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
                else:
                    out[i] = frame.to_ndarray(format="rgb24")
    return np.stack([out[i] for i in indices])


def timed(
    methods: dict[str, Callable[[], np.ndarray]], repeats: int
) -> dict[str, tuple[float, float, np.ndarray]]:
    """Median wall and CPU seconds of each method over `repeats` interleaved runs (after one
    warm-up each), and its output."""
    outputs = {name: fn() for name, fn in methods.items()}
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: (statistics.median(wall[name]), statistics.median(cpu[name]), outputs[name])
        for name in methods
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames in the synthetic video")
    parser.add_argument("--size", type=int, default=224, help="frame width and height")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of the video")
    parser.add_argument("--sample", type=int, default=8, help="uniform frames to sample (8, 16)")
    parser.add_argument(
        "--gop", type=int, default=None, help="keyframe interval (default: libx264's, 250)"
    )
    parser.add_argument("--texture", action="store_true", help="pan over a noise texture")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.mp4"
        start = time.perf_counter()
        write_video(path, args.frames, args.size, args.fps, args.gop, args.texture)
        encode_s = time.perf_counter() - start

        pyav = VideoReader("pyav")
        info = pyav.info(path)
        indices = sample_indices(info.num_frames, info.avg_fps, max_frames=args.sample)
        lmm_reader = VideoReader()  # what load_video uses by default (here: a thread per core)
        one_thread = VideoReader(num_threads=1)  # its setting in a DataLoader worker
        decord = VideoReader("decord")
        results = timed(
            {
                "seek": lambda: lmm_reader.read(path, indices),
                "seek_1thread": lambda: one_thread.read(path, indices),
                "full_decode": lambda: full_decode(path, indices),
                "full_decode_fast_rgb": lambda: full_decode(path, indices, fast_rgb=True),
                "decord_seek": lambda: decord.read(path, indices),
                "pyav": lambda: pyav.read(path, indices),
            },
            args.repeats,
        )

    reference = results["full_decode"][2].astype(int)
    diff = {k: int(np.abs(out.astype(int) - reference).max()) for k, (_, _, out) in results.items()}
    identical = bool(np.array_equal(results["seek"][2], results["full_decode"][2]))
    k = len(indices)
    fps = {name: k / seconds for name, (seconds, _, _) in results.items()}
    cpu_ms = {name: round(1e3 * cpu, 1) for name, (_, cpu, _) in results.items()}

    print(
        f"video: {info.num_frames} frames {info.width}x{info.height} @ {info.avg_fps:g} fps, "
        f"gop={args.gop or 'libx264 default'}, texture={args.texture}, encoded in {encode_s:.2f}s"
    )
    print(f"sampled {k} uniform frames {indices}; median of {args.repeats}\n")
    print(f"{'method':<44}{'ms/video':>10}{'frames/s':>10}{'max|diff|':>11}")
    labels = {
        "seek": f"lmm VideoReader() ({lmm_reader.threads()} threads)",
        "seek_1thread": "lmm VideoReader(num_threads=1) (in a worker)",
        "full_decode": "PyAV decode all, keep sampled (to_ndarray)",
        "full_decode_fast_rgb": "PyAV decode all, one swscale context",
        "decord_seek": "decord seek (VideoReader decord)",
        "pyav": "VideoReader pyav",
    }
    for name, (seconds, _, _) in results.items():
        print(f"{labels[name]:<44}{seconds * 1e3:>10.1f}{fps[name]:>10.1f}{diff[name]:>11}")
    print(
        json.dumps(
            {
                "seek_fps": round(fps["seek"], 1),
                "seek_1thread_fps": round(fps["seek_1thread"], 1),
                "seek_threads": lmm_reader.threads(),
                "full_decode_fps": round(fps["full_decode"], 1),
                "full_decode_fast_rgb_fps": round(fps["full_decode_fast_rgb"], 1),
                "seek_vs_full_decode": round(fps["seek"] / fps["full_decode"], 2),
                "seek_vs_full_decode_fast_rgb": round(fps["seek"] / fps["full_decode_fast_rgb"], 2),
                "identical": identical,
                "seek_1thread_vs_full_decode": round(fps["seek_1thread"] / fps["full_decode"], 2),
                "seek_cpu_ms": cpu_ms["seek"],
                "seek_1thread_cpu_ms": cpu_ms["seek_1thread"],
                "full_decode_cpu_ms": cpu_ms["full_decode"],
                "full_decode_fast_rgb_cpu_ms": cpu_ms["full_decode_fast_rgb"],
                "decord_seek_fps": round(fps["decord_seek"], 1),
                "pyav_fps": round(fps["pyav"], 1),
                "frames_sampled": k,
                "video_frames": info.num_frames,
                "size": args.size,
                "gop": args.gop,
                "texture": args.texture,
                "repeats": args.repeats,
                "max_abs_diff_vs_full_decode": max(diff.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
