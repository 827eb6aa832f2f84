"""Video frame sampling and decoding: exact indices, decord = PyAV, and bad files as BadRecordError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from lmm.data import video as video_module  # noqa: E402
from lmm.data.sample import BadRecordError  # noqa: E402
from lmm.data.video import (  # noqa: E402
    VideoError,
    VideoInfo,
    VideoReader,
    load_video,
    sample_indices,
)

SIZE = 64
BITS = 6  # frame index written as 6 black/white stripes, 8 px wide: robust to YUV rounding
STRIPE = 8


def frame_image(i: int) -> np.ndarray:
    """Frame `i`: its index in binary stripes on the left, a colour ramp on the right."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)  # [H, W, 3]
    for b in range(BITS):
        if (i >> b) & 1:
            img[:, b * STRIPE : (b + 1) * STRIPE] = 255
    img[:, BITS * STRIPE :, 0] = (i * 5) % 256
    img[:, BITS * STRIPE :, 1] = 128
    return img


def frame_index(frame: np.ndarray) -> int:
    """Read back the index `frame_image` wrote."""
    means = [frame[:, b * STRIPE : (b + 1) * STRIPE].mean() for b in range(BITS)]
    return sum(1 << b for b, m in enumerate(means) if m > 128)


def write_video(
    path: Path, n: int = 45, fps: int = 30, gop: int = 10, faststart: bool = False
) -> Path:
    """An H.264 file of `n` frames; a short GOP so that seeking crosses keyframes."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


# sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((30, 30.0), {}, [0, 4, 8, 12, 17, 21, 25, 29]),  # linspace(0, 29, 8).round()
        ((5, 30.0), {}, [0, 1, 2, 3, 4]),  # fewer frames than max_frames: all of them
        ((10, 30.0), {"max_frames": 1}, [0]),
        ((10, 30.0), {"max_frames": 3}, [0, 4, 9]),  # 4.5 rounds half to even
        ((60, 30.0), {"strategy": "fps", "fps": 2}, [0, 15, 30, 45]),  # every 15th
        ((100, 29.97), {"strategy": "fps", "fps": 2}, [0, 15, 30, 45, 60, 75, 90]),  # ceil(14.985)
        ((10, 30.0), {"strategy": "fps", "fps": 60, "max_frames": 4}, [0, 3, 6, 9]),  # step 1
        ((300, 30.0), {"strategy": "fps", "fps": 1, "max_frames": 4}, [0, 90, 180, 270]),
        ((30, 30.0), {"strategy": "segments"}, [1, 5, 9, 13, 16, 20, 24, 28]),  # 3.75 per segment
        ((10, 30.0), {"strategy": "segments", "max_frames": 4}, [1, 3, 6, 8]),  # 2.5 per segment
        ((4, 30.0), {"strategy": "segments"}, [0, 1, 2, 3]),
    ],
)
def test_sample_indices(args, kwargs, expected):
    assert sample_indices(*args, **kwargs) == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((30, 30.0), {"strategy": "random"}, "strategy must be one of"),
        ((30, 30.0), {"max_frames": 0}, "max_frames must be"),
        ((30, 30.0), {"strategy": "fps"}, "needs fps > 0"),
        ((30, 30.0), {"strategy": "fps", "fps": 0}, "needs fps > 0"),
        ((30, 30.0), {"fps": 1.0}, "used only by strategy='fps'"),
        ((0, 30.0), {}, "num_frames must be"),
        ((30, 0.0), {"strategy": "fps", "fps": 1}, "avg_fps > 0"),
    ],
)
def test_sample_indices_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_indices(*args, **kwargs)


# decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_reader_returns_the_asked_frames(video, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    reader = VideoReader(backend)
    assert reader.info(video) == VideoInfo(num_frames=45, avg_fps=30.0, width=SIZE, height=SIZE)
    indices = [44, 0, 17, 17, 3, 31]  # unsorted, repeated, across keyframes (every 10)
    frames = reader.read(video, indices)
    assert frames.shape == (6, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert [frame_index(f) for f in frames] == indices


def test_decord_and_pyav_decode_the_same_pixels(video):
    pytest.importorskip("decord")
    indices = list(range(45))
    a = VideoReader("decord").read(video, indices).astype(int)
    b = VideoReader("pyav").read(video, indices).astype(int)
    assert np.abs(a - b).max() <= 2  # only YUV -> RGB rounding may differ
    # and both are the frames that were encoded, up to lossy compression
    expected = np.stack([frame_image(i) for i in indices]).astype(int)
    assert np.abs(b - expected).mean() < 4


def test_pyav_counts_frames_when_the_header_has_none(tmp_path):
    # Matroska stores no frame count: stream.frames is 0
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.gop_size = 5
        for i in range(12):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_image(i), "rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    reader = VideoReader("pyav")
    assert reader.info(path).num_frames == 12
    assert [frame_index(f) for f in reader.read(path, [11, 2, 7])] == [11, 2, 7]


def test_auto_falls_back_to_decord_when_pyav_fails(video, monkeypatch):
    pytest.importorskip("decord")

    def broken(self, path, *args):
        raise VideoError(f"{path}: PyAV cannot decode")

    monkeypatch.setattr(VideoReader, "_pyav_read", broken)
    frames = VideoReader("auto").read(video, [5, 40])
    assert [frame_index(f) for f in frames] == [5, 40]
    with pytest.raises(VideoError, match="PyAV cannot decode"):
        VideoReader("pyav").read(video, [5])

    def decord_broken(self, path, *args):
        raise RuntimeError("decord: cannot decode")

    monkeypatch.setattr(VideoReader, "_decord_read", decord_broken)
    with pytest.raises(VideoError, match="decord cannot read it: decord: cannot decode"):
        VideoReader("decord").read(video, [5])
    with pytest.raises(VideoError, match="PyAV cannot decode"):  # both fail: PyAV's message
        VideoReader("auto").read(video, [5])


def test_reader_rejects_indices_past_the_end(video):
    with pytest.raises(VideoError, match="frame 45 asked but only 45 frames"):
        VideoReader("pyav").read(video, [0, 45])
    with pytest.raises(ValueError, match="empty"):
        VideoReader("pyav").read(video, [])


# load_video ----------------------------------------------------------------------------------


def test_load_video_returns_images_of_the_sampled_frames(video):
    images = load_video(video, max_frames=4, strategy="segments")
    assert [img.size for img in images] == [(SIZE, SIZE)] * 4
    assert [frame_index(np.asarray(img)) for img in images] == sample_indices(
        45, 30.0, strategy="segments", max_frames=4
    )
    images = load_video(video, max_frames=8, fps=3, strategy="fps", reader=VideoReader("pyav"))
    assert [frame_index(np.asarray(img)) for img in images] == [0, 10, 20, 30, 40]


def _bad(path: Path, **kwargs) -> BadRecordError:
    with pytest.raises(BadRecordError) as err:
        load_video(path, source="train.json", record_id="vid-7", **kwargs)
    assert "sample 'vid-7' (train.json)" in str(err.value)
    assert path.name in str(err.value)
    return err.value


def test_load_video_missing_file(tmp_path):
    assert "not found" in str(_bad(tmp_path / "nope.mp4"))


def test_load_video_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are not the frames you are looking for\n" * 20)
    assert "not a readable video" in str(_bad(path))


@pytest.mark.parametrize("faststart", [False, True])
def test_load_video_truncated(tmp_path, faststart):
    # moov at the end (PyAV's default): half the bytes lose the index, the file cannot open;
    # moov first (faststart): the header promises 45 frames but the data stops early
    data = write_video(tmp_path / "full.mp4", faststart=faststart).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    message = str(_bad(path, reader=VideoReader("pyav")))
    assert ("truncated" in message) if faststart else ("not a readable video" in message)
    _bad(path)  # auto: decord fails, PyAV fails, still a BadRecordError


def test_load_video_too_few_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", n=3)
    err = _bad(path, min_frames=8)
    assert "has 3 frames but min_frames=8" in str(err) and "Fix:" in str(err)
    err = _bad(write_video(tmp_path / "long.mp4"), min_frames=4, strategy="fps", fps=0.5)
    assert "samples 1, but min_frames=4" in str(err)


# sampling decodes each needed GOP once, with a full decode's pixels ---------------------------


def write_textured(path: Path, n: int, gop: int, bframes: int, open_gop: bool = False) -> Path:
    """A panning noise texture with a moving bar: P and B frames that really reference others."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 200, (SIZE, 3 * SIZE, 3), dtype=np.uint8)
    params = f"bframes={bframes}:keyint={gop}:min-keyint={gop}:scenecut=0"
    if open_gop:
        params += ":open-gop=1"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"x264-params": params})
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            img = pattern[:, i % (2 * SIZE) : i % (2 * SIZE) + SIZE].copy()
            img[:, (3 * i) % (SIZE - 6) :][:, :6] = (40, 200, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def full_decode(path: Path) -> np.ndarray:
    """Every frame, decoded in order from the start: what sampling must reproduce."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize(
    ("gop", "bframes", "open_gop"),
    [(1, 0, False), (7, 0, False), (12, 3, False), (30, 2, False), (250, 3, False), (12, 3, True)],
)
def test_sampled_frames_equal_a_full_decode(tmp_path, gop, bframes, open_gop):
    n = 61
    path = write_textured(tmp_path / "clip.mp4", n, gop, bframes, open_gop)
    every = full_decode(path)
    assert len(every) == n
    if bframes:  # the clip does exercise reordering and skippable frames
        with av.open(str(path)) as container:
            pts = [p.pts for p in container.demux(video=0) if p.size]
        assert pts != sorted(pts)
    boundaries = [g for g in range(gop, n, gop)] + [g - 1 for g in range(gop, n, gop)]
    requests = [
        [n - 1, 0, 30, 30, 5, n - 1],  # unsorted, repeated, the last frame
        sorted(set(boundaries))[:8] or [0],  # keyframes and the frames just before them
        [int(i) for i in np.linspace(0, n - 1, 8).round()],  # load_video's uniform sampling
        list(range(n)),  # every frame
        [n - 2, 1],
    ]
    reader = VideoReader("pyav", num_threads=1)
    threaded = VideoReader("pyav", num_threads=2)
    for indices in requests:
        expected = every[indices]
        assert np.array_equal(reader.read(path, indices), expected), indices
        assert np.array_equal(threaded.read(path, indices), expected), indices
    # the default reader (auto) is this path too
    assert np.array_equal(VideoReader().read(path, requests[0]), every[requests[0]])


def _packets(path: Path) -> list:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        length = video_module._avcc_nal_length(stream.codec_context)
        return [
            video_module._Packet(p.pts, p.is_keyframe, video_module._h264_disposable(p, length))
            for p in container.demux(stream)
            if p.size > 0
        ]


def test_each_needed_gop_is_decoded_once_in_file_order(tmp_path):
    path = write_textured(tmp_path / "clip.mp4", 90, gop=30, bframes=3)
    packets = _packets(path)
    keys = [p for p, packet in enumerate(packets) if packet.keyframe]
    assert len(keys) == 3
    # two frames in GOP 0, none in GOP 1, three in GOP 2: two spans, one seek each
    wanted = [3, 20, 61, 75, 89]
    runs = video_module._plan_runs(packets, wanted)
    assert [start for start, _ in runs] == [keys[0], keys[2]]
    order = sorted(range(len(packets)), key=lambda p: packets[p].pts)
    assert runs[0][1] == order[20] and runs[1][1] == max(order[i] for i in (61, 75, 89))
    # non-reference B-frames are found, and only those
    assert 0 < sum(p.disposable for p in packets) < len(packets) - len(keys)
    assert not any(packets[k].disposable for k in keys)


def test_spans_that_meet_merge_instead_of_seeking_back(tmp_path):
    path = write_textured(tmp_path / "clip.mp4", 40, gop=10, bframes=0)
    packets = _packets(path)  # no B-frames: decode position == frame index
    assert [p.pts for p in packets] == sorted(p.pts for p in packets)
    assert video_module._plan_runs(packets, [2, 9, 10, 35]) == [(0, 10), (30, 35)]
    assert not any(p.disposable for p in packets)  # every P frame is a reference


class _FramesOf(torch.utils.data.Dataset):
    def __init__(self, reader: VideoReader, path: Path):
        self.reader, self.path = reader, path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        return self.reader.threads(), torch.from_numpy(self.reader.read(self.path, [3, 40, 2]))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_threaded_reads_close_every_opening(tmp_path):
    """The other threads' openings start beside the demux pass; the ones no span needs (one
    GOP, or a read that fails) are closed too: no file stays open after a read."""
    one_gop = write_textured(tmp_path / "one.mp4", 30, 250, 0, False)
    many = write_textured(tmp_path / "many.mp4", 61, 10, 2, False)
    reader = VideoReader("pyav", num_threads=4)
    every = full_decode(many)
    reader.read(one_gop, [0])  # warm up: the pool's threads, FFmpeg's own state
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert reader.read(one_gop, [0, 29]).shape[0] == 2
        assert np.array_equal(reader.read(many, [0, 20, 40, 60]), every[[0, 20, 40, 60]])
        with pytest.raises(ValueError):
            reader.read(many, [61])  # past the end: refused after the packets are listed
    assert len(os.listdir("/proc/self/fd")) == before


def test_threads_one_in_a_worker_one_per_core_outside(video):
    """`num_threads=None`: a DataLoader worker decodes with one thread (workers already run in
    parallel), the main process shares the spans among a thread per core; same pixels."""
    reader = VideoReader("pyav")
    assert reader.threads() == min(os.cpu_count() or 1, 4)
    assert VideoReader(num_threads=0).threads() == (os.cpu_count() or 1)
    ((threads, frames),) = torch.utils.data.DataLoader(
        _FramesOf(reader, video), batch_size=None, num_workers=1
    )
    assert threads == 1
    assert np.array_equal(frames.numpy(), reader.read(video, [3, 40, 2]))
