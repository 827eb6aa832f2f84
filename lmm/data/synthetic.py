"""A seeded, procedurally drawn visual question-answering dataset in Mantis chat format.

Used by the CPU quickstart (`make demo`, `lmm synth`) and by tests: coloured shapes on a
grey background, one-word answers from a closed vocabulary, byte-identical for a given seed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lmm.data.sample import IMAGE_MARKER
from lmm.utils.logging import get_logger

log = get_logger(__name__)

TASKS: tuple[str, ...] = ("colour", "shape", "count", "which_image", "same_colour")
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
}

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


def _draw(shapes: list[Shape], size: int, rng: np.random.Generator) -> Image.Image:
    """Render `shapes` on a grey background with mild per-pixel noise."""
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


def _prompt(num_images: int, question: str) -> str:
    """The user turn: the question first, then the image, or each image after its label.

    Question first lets the image tokens attend to what is asked (attention is causal), so a
    model this small can learn all five tasks together within minutes of CPU training.
    """
    if num_images == 1:
        return f"{question}\n{IMAGE_MARKER}"
    return question + "".join(f"\nImage {j + 1}: {IMAGE_MARKER}" for j in range(num_images))


def corpus() -> list[str]:
    """Every user prompt and every answer the dataset can contain, for tokenizer training."""
    prompts = [_prompt(1, QUESTIONS[t]) for t in ("colour", "shape", "count")]
    prompts += [
        _prompt(n, QUESTIONS["which_image"].format(colour=c)) for n in (2, 3) for c in COLOURS
    ]
    prompts.append(_prompt(2, QUESTIONS["same_colour"]))
    return prompts + [*COLOURS, *SHAPES, *NUMBERS, "yes", "no"]


def vocabulary() -> list[str]:
    """Every word and punctuation mark of the questions and answers (without `<image>`)."""
    text = " ".join(corpus()).replace(IMAGE_MARKER, " ")
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


def generate(
    out: str | Path,
    *,
    train: int = 2000,
    val: int = 200,
    test: int = 200,
    image_size: int = 32,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
) -> dict:
    """Write images, `{train,val,test}.json` and `meta.json` under `out`; return the meta dict."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in _BUILDERS]
    if not tasks or unknown:
        raise ValueError(f"unknown task(s) {unknown} in {list(tasks)}; choose from {list(TASKS)}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is too small; use at least {MIN_IMAGE_SIZE}")
    if seed < 0:
        raise ValueError(f"seed {seed} is negative; use a seed >= 0")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    offset = 0  # ids run on across splits so image files never collide
    for split_index, (split, n) in enumerate(zip(SPLITS, (train, val, test), strict=True)):
        per_task = dict.fromkeys(tasks, 0)
        records = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            # One generator per sample, keyed by (seed, split, index): splits never share seeds.
            rng = np.random.default_rng([seed, split_index, i])
            images, question, answer = _BUILDERS[task](rng, image_size, per_task[task])
            per_task[task] += 1
            record_id = f"{task}-{offset + i:06d}"
            paths = [f"images/{record_id}_{j}.png" for j in range(len(images))]
            for path, shapes in zip(paths, images, strict=True):
                _draw(shapes, image_size, rng).save(out / path)
            conversation = [
                {"role": "user", "content": _prompt(len(images), question)},
                {"role": "assistant", "content": answer},
            ]
            records.append(
                {"id": record_id, "task": task, "images": paths, "conversation": conversation}
            )
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
        },
        "counts": counts,
        "vocabulary": vocabulary(),
    }
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
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    return generate(
        args.out,
        train=args.train,
        val=args.val,
        test=args.test,
        image_size=args.image_size,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
