"""A seeded, procedurally drawn visual question-answering dataset in Mantis chat format.

Used by the CPU quickstart (`make demo`, `lmm synth`) and by tests: coloured shapes on a
grey background, one-word answers from a closed vocabulary, byte-identical for a given seed.
Beyond the five image tasks (`TASKS`, the default): `motion`, a short mp4 of a shape moving
left, right, up or down (answer: the direction), and `score`, Mantis `classification`
records (VideoScore's form) whose targets, `brightness` and `count` in [1, 4], are read
from the image. Score records cannot share a batch with chat records, so `score` is
generated on its own.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lmm.data.formats import VIDEO_MARKER
from lmm.data.sample import IMAGE_MARKER
from lmm.utils.logging import get_logger

log = get_logger(__name__)

TASKS: tuple[str, ...] = ("colour", "shape", "count", "which_image", "same_colour")
VIDEO_TASKS: tuple[str, ...] = ("motion",)
SCORE_TASKS: tuple[str, ...] = ("score",)
ALL_TASKS: tuple[str, ...] = TASKS + VIDEO_TASKS + SCORE_TASKS
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Saturated and far apart in RGB, so they stay distinct from each other and from the grey
# background after noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: tuple[str, ...] = ("one", "two", "three")
BACKGROUND = (200, 236)  # grey level range of the background, [low, high)
NOISE = 8  # per-pixel, per-channel uniform noise in [-NOISE, NOISE]
MIN_IMAGE_SIZE = 16

QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "which_image": "Which image shows a {colour} shape?",
    "same_colour": "Do image 1 and image 2 show the same colour?",
    "motion": "Which way does the shape move?",
}
DIRECTIONS: dict[str, tuple[int, int]] = {  # answer -> (dx, dy) in image coordinates
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
MOTION_SPAN = 0.4  # how far the shape travels over the clip, as a fraction of the frame
VIDEO_FPS = 4
SCORE_PROMPT = "Rate the brightness of the background and the number of shapes, from 1 to 4."
SCORE_LABELS: tuple[str, ...] = ("brightness", "count")
SCORE_GREY = (40, 220)  # background grey level of brightness 1.0 and 4.0

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
Shape = tuple[str, str, Box]  # kind, colour name, box
Drawn = tuple[list[list[Shape]], str, str]  # shapes per image, question, answer


def _place(rng: np.random.Generator, size: int, n: int, lo: float, hi: float) -> list[Box]:
    """Draw `n` square boxes of side in [lo, hi]·size, inside the image and 2+ px apart."""
    side_lo, side_hi = max(4, round(lo * size)), max(4, round(hi * size))
    for _ in range(1000):
        boxes: list[Box] = []
        for _ in range(n):
            s = int(rng.integers(side_lo, side_hi + 1))
            x, y = (int(v) for v in rng.integers(1, size - s, size=2))
            box = (x, y, x + s - 1, y + s - 1)
            if any(_near(box, b) for b in boxes):
                break
            boxes.append(box)
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} shapes in a {size} px image; raise image_size")


def _near(a: Box, b: Box, gap: int = 2) -> bool:
    """Whether boxes `a` and `b` overlap or are fewer than `gap` background pixels apart."""
    return a[0] <= b[2] + gap and b[0] <= a[2] + gap and a[1] <= b[3] + gap and b[1] <= a[3] + gap


def _draw(
    shapes: list[Shape], size: int, rng: np.random.Generator, grey: int | None = None
) -> Image.Image:
    """Render `shapes` on a grey background (random unless `grey`) with mild per-pixel noise."""
    if grey is None:
        grey = int(rng.integers(*BACKGROUND))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for kind, colour, (x0, y0, x1, y1) in shapes:
        fill = COLOURS[colour]
        if kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-NOISE, NOISE + 1, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _one(rng: np.random.Generator, size: int, colour: str | None = None) -> list[Shape]:
    """A single shape of random kind, size and position (of `colour` if given)."""
    colour = colour or _pick(rng, list(COLOURS))
    return [(_pick(rng, SHAPES), colour, _place(rng, size, 1, 0.4, 0.75)[0])]


def _colour(rng: np.random.Generator, size: int, k: int) -> Drawn:
    shapes = _one(rng, size)
    return [shapes], QUESTIONS["colour"], shapes[0][1]


def _shape(rng: np.random.Generator, size: int, k: int) -> Drawn:
    shapes = _one(rng, size)
    return [shapes], QUESTIONS["shape"], shapes[0][0]


def _count(rng: np.random.Generator, size: int, k: int) -> Drawn:
    n, colour = 1 + int(rng.integers(3)), _pick(rng, list(COLOURS))
    shapes = [(_pick(rng, SHAPES), colour, box) for box in _place(rng, size, n, 0.22, 0.34)]
    return [shapes], QUESTIONS["count"], NUMBERS[n - 1]


def _which_image(rng: np.random.Generator, size: int, k: int) -> Drawn:
    n, colour = 2 + int(rng.integers(2)), _pick(rng, list(COLOURS))
    target = int(rng.integers(n))
    others = [c for c in COLOURS if c != colour]
    images = [_one(rng, size, colour if j == target else _pick(rng, others)) for j in range(n)]
    return images, QUESTIONS["which_image"].format(colour=colour), NUMBERS[target]


def _same_colour(rng: np.random.Generator, size: int, k: int) -> Drawn:
    same = k % 2 == 0  # alternate, so yes/no are exactly balanced per split
    first = _pick(rng, list(COLOURS))
    second = first if same else _pick(rng, [c for c in COLOURS if c != first])
    images = [_one(rng, size, first), _one(rng, size, second)]
    return images, QUESTIONS["same_colour"], "yes" if same else "no"


_BUILDERS: dict[str, Callable[[np.random.Generator, int, int], Drawn]] = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "which_image": _which_image,
    "same_colour": _same_colour,
}


def _motion(
    rng: np.random.Generator, size: int, k: int, frames: int
) -> tuple[list[Image.Image], str]:
    """Frames of one shape moving `MOTION_SPAN`·size in a straight line, and the direction.

    Directions cycle with `k`, so they are exactly balanced per split. The start is random
    within the room the path leaves, so no single frame tells the direction for sure.
    """
    direction = list(DIRECTIONS)[k % len(DIRECTIONS)]
    dx, dy = DIRECTIONS[direction]
    side = int(rng.integers(round(0.25 * size), round(0.35 * size) + 1))
    span = round(MOTION_SPAN * size)
    far = size - 1 - side  # the last top-left coordinate that keeps the shape inside

    def start(d: int) -> int:
        lo, hi = (1, far - span) if d > 0 else (1 + span, far) if d < 0 else (1, far)
        return int(rng.integers(lo, hi + 1))

    x, y = start(dx), start(dy)
    kind = _pick(rng, SHAPES)
    colour = _pick(rng, list(COLOURS))
    grey = int(rng.integers(*BACKGROUND))  # one background for the whole clip
    images = []
    for t in range(frames):
        step = round(span * t / (frames - 1))
        x0, y0 = x + dx * step, y + dy * step
        images.append(
            _draw([(kind, colour, (x0, y0, x0 + side - 1, y0 + side - 1))], size, rng, grey)
        )
    return images, direction


def _score(rng: np.random.Generator, size: int, k: int) -> tuple[Image.Image, dict[str, float]]:
    """One image and its scores: `brightness` (of the background, 1.0-4.0) and `count` (1-4)."""
    brightness = round(float(rng.uniform(1.0, 4.0)), 2)
    lo, hi = SCORE_GREY
    grey = round(lo + (brightness - 1.0) / 3.0 * (hi - lo))
    n, colour = 1 + int(rng.integers(4)), _pick(rng, list(COLOURS))
    shapes = [(_pick(rng, SHAPES), colour, box) for box in _place(rng, size, n, 0.2, 0.3)]
    return _draw(shapes, size, rng, grey), {"brightness": brightness, "count": float(n)}


def write_video(path: str | Path, frames: Sequence[Image.Image], fps: int = VIDEO_FPS) -> Path:
    """Encode RGB frames as an H.264 mp4 with PyAV, byte-identical for the same frames.

    Constant quantiser, one thread: x264's rate control (CRF with mb-tree and adaptive
    quantisation) gave different bytes for the same frames within one process.
    """
    import av  # PyAV: only needed to write the video tasks

    width, height = frames[0].size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "10"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def _prompt(num_images: int, question: str) -> str:
    """The user turn: the question first, then the image, or each image after its label.

    Question first lets the image tokens attend to what is asked (attention is causal), so a
    model this small can learn all five tasks together within minutes of CPU training.
    """
    if num_images == 1:
        return f"{question}\n{IMAGE_MARKER}"
    return question + "".join(f"\nImage {j + 1}: {IMAGE_MARKER}" for j in range(num_images))


def _video_prompt(question: str) -> str:
    return f"{question}\n{VIDEO_MARKER}"


def corpus(tasks: Sequence[str] = TASKS) -> list[str]:
    """Every user prompt and every answer `tasks` can contain, for tokenizer training.

    The image tasks share one corpus (any of them brings all of it, as before the video and
    score tasks existed, so the default tokenizer is unchanged); `motion` and `score` add theirs.
    """
    texts: list[str] = []
    if any(t in TASKS for t in tasks):
        texts += [_prompt(1, QUESTIONS[t]) for t in ("colour", "shape", "count")]
        texts += [
            _prompt(n, QUESTIONS["which_image"].format(colour=c)) for n in (2, 3) for c in COLOURS
        ]
        texts.append(_prompt(2, QUESTIONS["same_colour"]))
        texts += [*COLOURS, *SHAPES, *NUMBERS, "yes", "no"]
    if "motion" in tasks:
        texts += [_video_prompt(QUESTIONS["motion"]), *DIRECTIONS]
    if "score" in tasks:
        texts.append(SCORE_PROMPT)
    return texts


def vocabulary(tasks: Sequence[str] = TASKS) -> list[str]:
    """Every word and punctuation mark of the questions and answers (without media markers)."""
    text = " ".join(corpus(tasks)).replace(IMAGE_MARKER, " ").replace(VIDEO_MARKER, " ")
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


def _record(
    task: str, rng: np.random.Generator, out: Path, record_id: str, size: int, k: int, frames: int
) -> dict:
    """Draw sample `k` of `task`, write its media under `out` and return its record."""
    if task == "score":
        image, scores = _score(rng, size, k)
        path = f"images/{record_id}_0.png"
        image.save(out / path)
        return {
            "id": record_id,
            "task": task,
            "images": [path],
            "prompt": SCORE_PROMPT,
            "labels": {name: scores[name] for name in SCORE_LABELS},
        }
    if task == "motion":
        clip, answer = _motion(rng, size, k, frames)
        path = f"videos/{record_id}.mp4"
        write_video(out / path, clip)
        media = {"video": path}
        question = _video_prompt(QUESTIONS["motion"])
    else:
        images, question, answer = _BUILDERS[task](rng, size, k)
        paths = [f"images/{record_id}_{j}.png" for j in range(len(images))]
        for path, shapes in zip(paths, images, strict=True):
            _draw(shapes, size, rng).save(out / path)
        media = {"images": paths}
        question = _prompt(len(images), question)
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    return {"id": record_id, "task": task, **media, "conversation": conversation}


def generate(
    out: str | Path,
    *,
    train: int = 2000,
    val: int = 200,
    test: int = 200,
    image_size: int = 32,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    frames: int = 4,
) -> dict:
    """Write media, `{train,val,test}.json` and `meta.json` under `out`; return the meta dict.

    `frames` is the length of the `motion` task's clips (mp4 under `videos/`).
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if not tasks or unknown:
        raise ValueError(
            f"unknown task(s) {unknown} in {list(tasks)}; choose from {list(ALL_TASKS)}"
        )
    if "score" in tasks and len(tasks) > 1:
        raise ValueError(
            f"tasks {list(tasks)}: `score` writes scored (classification) records, which cannot "
            "share a batch with chat records; generate it on its own, into its own folder"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is too small; use at least {MIN_IMAGE_SIZE}")
    if seed < 0:
        raise ValueError(f"seed {seed} is negative; use a seed >= 0")
    if frames < 2:
        raise ValueError(f"frames {frames}: a motion clip needs at least 2 frames")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if "motion" in tasks:
        (out / "videos").mkdir(exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    offset = 0  # ids run on across splits so image files never collide
    for split_index, (split, n) in enumerate(zip(SPLITS, (train, val, test), strict=True)):
        per_task = dict.fromkeys(tasks, 0)
        records = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            # One generator per sample, keyed by (seed, split, index): splits never share seeds.
            rng = np.random.default_rng([seed, split_index, i])
            record_id = f"{task}-{offset + i:06d}"
            records.append(_record(task, rng, out, record_id, image_size, per_task[task], frames))
            per_task[task] += 1
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        counts[split] = per_task
        offset += n
    meta = {
        "args": {
            "train": train,
            "val": val,
            "test": test,
            "image_size": image_size,
            "tasks": list(tasks),
            "seed": seed,
            "frames": frames,
        },
        "counts": counts,
        "vocabulary": vocabulary(tasks),
    }
    if "score" in tasks:
        meta["labels"] = list(SCORE_LABELS)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info(
        "wrote %d train / %d val / %d test samples (%d px, tasks %s) to %s",
        train, val, test, image_size, ",".join(tasks), out,
    )  # fmt: skip
    return meta


def main(argv: list[str] | None = None) -> dict:
    """`lmm synth`: parse arguments and call `generate`."""
    parser = argparse.ArgumentParser(
        prog="lmm synth", description="Write the seeded synthetic VQA dataset."
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="training samples")
    parser.add_argument("--val", type=int, default=200, help="validation samples")
    parser.add_argument("--test", type=int, default=200, help="test samples")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated task names, of {','.join(ALL_TASKS)} (`score` on its own)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--frames", type=int, default=4, help="frames of a motion clip")
    options = vars(parser.parse_args(argv))  # the flags are generate's arguments
    out = options.pop("out")
    options["tasks"] = [t.strip() for t in options["tasks"].split(",") if t.strip()]
    return generate(out, **options)


if __name__ == "__main__":
    main()
