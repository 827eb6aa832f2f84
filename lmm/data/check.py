"""`lmm data check`: validate a data file or mixture exactly as training reads it, and report
what one epoch of training sees.

Every distinct record of the epoch goes through fit's own steps: the reader (parse, media
paths, score labels), `Processor.length` (the tokens fit plans with; a video's frames from
its header) and, unless `fast`, the processor itself (images decoded with their budgets,
videos' frames sampled and decoded). A record any step refuses is bad: the bad records are
exactly those `on_bad_record: skip` skips in fit. Without a tokenizer the media are still
decoded. The report gives per-source counts, the bad records (file, id, problem), token-
length and image-count histograms, and the share of real tokens in padded and packed batches.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from lmm.data.formats import VideoOptions
from lmm.data.media import ImageTransform
from lmm.data.mixture import Mixture, SkippedRecord
from lmm.data.packing import first_fit_decreasing
from lmm.data.policy import Preprocessing
from lmm.data.processor import MediaSpec, Processor, load_media
from lmm.data.sample import IMAGE_MARKER, BadRecordError, Sample
from lmm.data.templates import ChatTemplate, build_template
from lmm.data.tokenization import load_tokenizer
from lmm.data.video import VideoReader
from lmm.utils.logging import get_logger

log = get_logger(__name__)

BAR_WIDTH = 40
# CLIP's normalisation, for the stub transform (its pixels are made and dropped).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class StubMedia(MediaSpec):
    """A media spec with a fixed token count per image: counts tokens without a model."""

    transform: ImageTransform
    tokens: int

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """`tokens`, whatever the image size."""
        return self.tokens


def load_template(path: str):
    """A chat template from its class path (`lmm.data.templates.Llama3`, or just `Llama3`)."""
    module_name, _, class_name = path.rpartition(".")
    module = importlib.import_module(module_name or "lmm.data.templates")
    try:
        return getattr(module, class_name)()
    except AttributeError:
        raise ValueError(
            f"template {path!r}: {module.__name__} has no class {class_name!r}"
        ) from None


def build_processor(
    tokenizer: str,
    template: str | ChatTemplate = "lmm.data.templates.Llama3",
    image_tokens: int = 576,
    image_size: int = 336,
    max_length: int = 2048,
    image_token: str = IMAGE_MARKER,
    preprocessing: Preprocessing | None = None,
) -> Processor:
    """A processor for counting tokens: the tokenizer (with `image_token` added if missing)."""
    tok = load_tokenizer(tokenizer, image_token)
    media = StubMedia(ImageTransform(image_size, _MEAN, _STD), image_tokens)
    template = template if isinstance(template, ChatTemplate) else load_template(template)
    return Processor(tok, template, media, max_length, image_token, preprocessing)


# What `--recipe` takes from the recipe's data module besides template and preprocessing:
# ChatDataModule's arguments that decide which records fit reads, skips and how it batches.
RECIPE_DATA = (
    "train",
    "root",
    "allow_outside_root",
    "max_length",
    "pack_tokens",
    "batch_size",
    "buffer_size",
    "max_frames",
    "fps",
    "labels",
    "seed",
)


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> dict:
    """A recipe YAML with `lmm fit`-style overrides applied: `--model.init_args.tokenizer=DIR`
    (or `--data.init_args.max_length 512`); each value is read as YAML."""
    config = yaml.safe_load(Path(recipe).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{recipe}: not a YAML mapping; expected an lmm training recipe")
    args = list(overrides)
    while args:
        flag = args.pop(0)
        key, eq, value = flag.removeprefix("--").partition("=")
        if not flag.startswith("--") or not key.startswith(("model.", "data.")):
            raise ValueError(
                f"unknown argument {flag!r}. Fix: override a recipe value as "
                "--model.init_args.KEY=VALUE or --data.init_args.KEY=VALUE"
            )
        if not eq:
            if not args:
                raise ValueError(f"{flag}: no value. Fix: give {flag}=VALUE")
            value = args.pop(0)
        node = config
        *parents, last = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[last] = yaml.safe_load(value)
    return config


def recipe_data(recipe: str | Path | dict) -> dict:
    """What `lmm data check --recipe` takes from a recipe (a path, or `load_recipe`'s dict): its
    data module's template (with its init_args), preprocessing and the `RECIPE_DATA` it sets."""
    config = load_recipe(recipe) if not isinstance(recipe, dict) else recipe
    data = (config or {}).get("data", {}).get("init_args", {})
    if "template" not in data:
        raise ValueError(f"{recipe}: no data.init_args.template; is it an lmm training recipe?")
    return {
        "template": build_template(data["template"]),
        "preprocessing": Preprocessing(**data.get("preprocessing", {})),
        **{key: data[key] for key in RECIPE_DATA if key in data},
    }


def padded_share(lengths: Sequence[int], batch_size: int) -> float | None:
    """Real tokens / batch tokens when consecutive samples are padded to their batch's longest."""
    cost = sum(
        len(batch) * max(batch)
        for batch in (lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size))
    )
    return sum(lengths) / cost if cost else None


def packed_share(
    lengths: Sequence[int], pack_tokens: int, batch_size: int, buffer_size: int
) -> tuple[float | None, int]:
    """(real-token share, rows) when packing first-fit decreasing as TrainStream does.

    Each block of `buffer_size` samples is packed into rows of at most `pack_tokens`; rows are
    cut into batches of `batch_size`, each padded to its longest row (what PackCollator does).
    """
    real, cost, rows = 0, 0, 0
    for start in range(0, len(lengths), buffer_size):
        block = lengths[start : start + buffer_size]
        bins = first_fit_decreasing(block, pack_tokens)
        row_lengths = [sum(block[i] for i in b) for b in bins]
        rows += len(row_lengths)
        real += sum(block)
        for i in range(0, len(row_lengths), batch_size):
            batch = row_lengths[i : i + batch_size]
            cost += len(batch) * max(batch)
    return (real / cost if cost else None), rows


def histogram(values: Sequence[int], bins: int) -> list[dict]:
    """Equal-width integer bins from min to max: `[{"from", "to", "count"}]`."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = Counter((v - lo) // width for v in values)
    return [
        {"from": lo + k * width, "to": lo + (k + 1) * width - 1, "count": counts.get(k, 0)}
        for k in range((hi - lo) // width + 1)
    ]


def check(
    data: str | Path,
    *,
    processor: Processor | None = None,
    tokenizer: str | None = None,
    template: str | ChatTemplate = "lmm.data.templates.Llama3",
    image_tokens: int = 576,
    image_size: int = 336,
    max_length: int = 2048,
    pack_tokens: int | None = None,
    preprocessing: Preprocessing | None = None,
    max_frames: int = 8,
    fps: float | None = None,
    labels: Sequence[str] | None = None,
    fast: bool = False,
    batch_size: int = 8,
    buffer_size: int = 1024,
    split: str = "train",
    epoch: int = 0,
    seed: int = 0,
    root: str | None = None,
    allow_outside_root: bool = False,
    check_media: bool = True,
    bins: int = 10,
    show: int = 50,
    out=None,
) -> dict:
    """Check every record of one epoch of `data` as fit reads it; write the report to `out`
    and return it.

    Each distinct record is read (`Mixture.sample`), its tokens counted (`Processor.length`)
    and, unless `fast`, processed (`Processor.__call__`: images decoded, video frames sampled
    and decoded); the first step to refuse it makes it bad with that step's problem, as
    `on_bad_record: skip` skips it in fit. Without a processor (no `processor`, no `tokenizer`)
    the media are decoded all the same, as fit decodes them (`lmm.data.processor.load_media`).

    Args:
        data: a json/jsonl file (`{a,b}.json` allowed) or a mixture YAML.
        processor: the processor fit uses (a model's tokenizer and media spec); its
            `max_length` and preprocessing apply. Give it or `tokenizer`, not both.
        tokenizer: tokenizer folder for a stub processor (`--image-tokens` per image); without
            it or `processor`, tokens and batch shares are not counted.
        template: chat template class path (or a template), for the stub processor.
        image_tokens: tokens per image, for the stub processor.
        image_size: side of the stub processor's image transform.
        max_length: the stub processor's max_length (longer samples lose rounds from the end).
        pack_tokens: row size for the packed share (default: the processor's max_length).
        preprocessing: marker, truncation and tokenization policies (a recipe's; default: the
            processor's).
        max_frames: frames sampled per video of a json file (ChatDataModule's `max_frames`).
        fps: frames per second sampled from a json file's videos (ChatDataModule's `fps`).
        labels: score names of a json file's scored records (ChatDataModule's `labels`).
        fast: read headers only, decode nothing (the reader and `Processor.length`): broken
            image files and undecodable video frames then pass.
        batch_size: rows per batch for both shares.
        buffer_size: samples packed together (TrainStream's buffer_size).
        split: the split of a mixture YAML to check.
        epoch: the epoch to check (the order and the rules' draws depend on it and on seed).
        seed: the mixture seed.
        root: media folder for sources without their own (default: each data file's folder).
        allow_outside_root: accept absolute media paths and paths with `..`.
        check_media: check media files; False neither stats nor decodes them (implies `fast`).
        bins: bins of the token-length histogram.
        show: bad records listed in the text report (the returned dict has them all).
        out: where the text report goes (default: stdout).
    """
    if processor is not None and tokenizer is not None:
        raise ValueError("check: give processor (the one fit uses) or tokenizer (a stub), not both")
    if processor is None and tokenizer is not None:
        processor = build_processor(
            tokenizer, template, image_tokens, image_size, max_length, preprocessing=preprocessing
        )
    if preprocessing is None and processor is not None:
        preprocessing = processor.policy  # fit reads records with its processor's policy
    if processor is not None:
        max_length = processor.max_length
    pack_tokens = pack_tokens or max_length
    fast = fast or not check_media
    video = VideoOptions(max_frames=max_frames, fps=fps)
    mixture = Mixture.from_path(data, split, seed=seed, video=video, labels=labels)
    reader = processor.video_reader if processor is not None else VideoReader()

    outcomes: dict[tuple[int, int], tuple[str, object]] = {}
    lengths: list[int] = []
    images: list[int] = []
    slots: list[int] = []
    epoch_count: Counter[int] = Counter()
    order = mixture.order(epoch)
    for s, i in tqdm(order, desc="checking", unit="rec", disable=None):
        key = (int(s), int(i))
        epoch_count[key[0]] += 1
        if key not in outcomes:
            item = mixture.sample(
                *key,
                root=root,
                allow_outside_root=allow_outside_root,
                check_media=check_media,
                policy=preprocessing,
            )
            outcomes[key] = _outcome(item, processor, fast, reader)
        kind, value = outcomes[key]
        if kind == "ok":
            n_tokens, n_images, n_slots = value
            images.append(n_images)
            if n_tokens is not None:
                lengths.append(n_tokens)
                slots.append(n_slots)

    stats = {
        "data": str(data),
        "split": split,
        "epoch": epoch,
        "seed": seed,
        "balancing": mixture.balancing,
        "media": "decoded" if not fast else ("headers" if check_media else "unchecked"),
        "tokens_counted_by": _counted_by(processor),
        "sources": _source_rows(mixture, outcomes, epoch_count),
        "bad": _listed(mixture, outcomes, "bad"),
        "skipped": _listed(mixture, outcomes, "skipped"),
        "images": {"histogram": dict(sorted(Counter(images).items()))},
        "tokens": None,
        "batches": None,
    }
    stats["total"] = {
        key: sum(row[key] for row in stats["sources"])
        for key in ("size", "distinct", "epoch", "ok", "bad", "skipped")
    }
    if processor is not None and lengths:
        stats["tokens"] = {
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths),
            # for FLOPs (`lmm plan --data`): attention grows with the square of a sample's
            # length; media feature slots are the vision side's share of the tokens
            "mean_square": round(sum(n * n for n in lengths) / len(lengths), 1),
            "feature_slots_mean": round(sum(slots) / len(slots), 2),
            "histogram": histogram(lengths, bins),
        }
        packable = [n for n in lengths if n <= pack_tokens]
        packed, rows = packed_share(packable, pack_tokens, batch_size, buffer_size)
        stats["batches"] = {
            "batch_size": batch_size,
            "padded_share": padded_share(lengths, batch_size),
            "pack_tokens": pack_tokens,
            "packed_share": packed,
            "packed_rows": rows,
            "too_long_to_pack": len(lengths) - len(packable),
        }
    (out or sys.stdout).write(render(stats, show))
    total = stats["total"]
    log.info(
        "checked %d records of %s: %d ok, %d bad, %d skipped",
        total["distinct"],
        data,
        total["ok"],
        total["bad"],
        total["skipped"],
    )
    return stats


def _counted_by(processor: Processor | None) -> str | None:
    """What counted the tokens: the media spec (a stub's tokens per image) and the tokenizer."""
    if processor is None:
        return None
    media = processor.media
    tokenizer = getattr(processor.tokenizer, "name_or_path", "") or "?"
    if isinstance(media, StubMedia):
        return f"a stub media spec ({media.tokens} tokens per image), tokenizer {tokenizer}"
    return f"the media spec {type(media).__name__}, tokenizer {tokenizer}"


def _outcome(
    item: Sample | BadRecordError, processor: Processor | None, fast: bool, reader: VideoReader
) -> tuple[str, object]:
    """("ok", (tokens or None, images, feature slots or None)), ("bad", error) or ("skipped",
    error): fit's steps in
    fit's order (reader, `Processor.length` when planning, `Processor.__call__` when loading)."""
    if isinstance(item, SkippedRecord):
        return "skipped", item
    if isinstance(item, BadRecordError):
        return "bad", item
    n_tokens = n_slots = None
    try:
        if processor is not None:
            n_tokens = processor.length(item)
            n_slots = processor.feature_slots(item)
            if not fast:
                processor(item)
        elif not fast:
            for index in range(len(item.images)):
                load_media(item, index, reader)
    except BadRecordError as err:
        return "bad", err
    return "ok", (n_tokens, len(item.images), n_slots)


def _source_rows(mixture: Mixture, outcomes: dict, epoch_count: Counter) -> list[dict]:
    """Per source: records in the file, distinct records drawn, samples per epoch, outcomes."""
    kinds: dict[int, Counter[str]] = {s: Counter() for s in range(len(mixture.sources))}
    for (s, _), (kind, _) in outcomes.items():
        kinds[s][kind] += 1
    return [
        {
            "name": src.name,
            "path": src.path,
            "format": src.format,
            "rule": src.rule,
            "size": src.size,
            "distinct": sum(kinds[s].values()),
            "epoch": epoch_count[s],
            "ok": kinds[s]["ok"],
            "bad": kinds[s]["bad"],
            "skipped": kinds[s]["skipped"],
        }
        for s, src in enumerate(mixture.sources)
    ]


def _listed(mixture: Mixture, outcomes: dict, which: str) -> list[dict]:
    """The bad (or skipped) records in file order: source, file, index, id, problem."""
    return [
        {
            "source": mixture.sources[s].name,
            "file": err.source,
            "index": i,
            "id": err.record_id,
            "problem": err.problem,
        }
        for (s, i), (kind, err) in sorted(outcomes.items())
        if kind == which
    ]


def _bar(count: int, top: int) -> str:
    return "#" * (round(BAR_WIDTH * count / top) if top else 0)


_MEDIA = {
    "decoded": "decoded as in training (images, sampled video frames)",
    "headers": "files and video headers read, nothing decoded (--fast)",
    "unchecked": "not checked (--no-check-media)",
}


def render(stats: dict, show: int = 50) -> str:
    """The text report of `check`'s result."""
    lines = [
        f"lmm data check: {stats['data']} (split {stats['split']}, epoch {stats['epoch']}, "
        f"seed {stats['seed']}, balancing {'on' if stats['balancing'] else 'off'})",
        f"media: {_MEDIA[stats['media']]}",
    ]
    if stats["tokens_counted_by"]:
        lines.append(f"tokens counted with {stats['tokens_counted_by']}")
    rows = stats["sources"] + [{"name": "total", "format": "", "rule": "", **stats["total"]}]
    name_w = max(6, *(len(r["name"]) for r in rows))
    head = ("source", "format", "rule", "file", "distinct", "epoch", "ok", "bad", "skipped")
    fmt = f"  {{:<{name_w}}} {{:<14}} {{:<12}} {{:>8}} {{:>8}} {{:>8}} {{:>8}} {{:>6}} {{:>8}}"
    lines += ["", fmt.format(*head)]
    for r in rows:
        lines.append(
            fmt.format(
                r["name"],
                r["format"],
                r["rule"],
                r["size"],
                r["distinct"],
                r["epoch"],
                r["ok"],
                r["bad"],
                r["skipped"],
            )
        )
    for which in ("bad", "skipped"):
        listed = stats[which]
        if listed:
            lines += ["", f"{which} records ({len(listed)}):"]
            lines += [f"  {b['file']} [{b['id']}]: {b['problem']}" for b in listed[:show]]
            if len(listed) > show:
                lines.append(f"  ... and {len(listed) - show} more")
    tokens = stats["tokens"]
    if tokens is not None:
        lines += [
            "",
            f"tokens per sample (min {tokens['min']}, mean {tokens['mean']}, max {tokens['max']}; "
            f"media feature slots {tokens['feature_slots_mean']}, mean square "
            f"{tokens['mean_square']:.0f}):",
        ]
        top = max(b["count"] for b in tokens["histogram"])
        for b in tokens["histogram"]:
            span = f"{b['from']}-{b['to']}"
            lines.append(f"  {span:>13} {b['count']:>7} {_bar(b['count'], top)}")
    hist = stats["images"]["histogram"]
    if hist:
        lines += ["", "images per sample:"]
        top = max(hist.values())
        lines += [f"  {k:>13} {v:>7} {_bar(v, top)}" for k, v in hist.items()]
    batches = stats["batches"]
    if batches is not None:
        lines += [
            "",
            "real-token share of batch tokens:",
            f"  padded, batches of {batches['batch_size']} as loaded: "
            f"{_percent(batches['padded_share'])}",
            f"  packed first-fit decreasing, rows of {batches['pack_tokens']} tokens "
            f"({batches['packed_rows']} rows): {_percent(batches['packed_share'])}",
        ]
        if batches["too_long_to_pack"]:
            lines.append(
                f"  ({batches['too_long_to_pack']} samples longer than a row are left out of it)"
            )
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def main(argv: list[str] | None = None, model_processor=None) -> dict:
    """`lmm data check [DATA] [options] [--model.KEY=VALUE ...]`; returns the report (exit 1
    with --strict and bad records). `model_processor(config, template, max_length,
    preprocessing, where)` builds a recipe's model processor (the `lmm` command passes
    `lmm.training.recipe.model_processor`; data sits below training, so it is handed in);
    without it a recipe's tokens are counted with the stub media spec."""
    parser = argparse.ArgumentParser(prog="lmm data", description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "check",
        help="validate a data file or mixture as training reads it; report lengths and padding",
        description=__doc__,
        epilog="With --recipe, --model.init_args.KEY=VALUE and --data.init_args.KEY=VALUE "
        "override the recipe's values as they do for `lmm fit`.",
    )
    p.add_argument(
        "data",
        nargs="?",
        help="a json/jsonl file ({a,b}.json allowed) or a mixture YAML "
        "(default: the recipe's data.train)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder for the stub media spec")
    p.add_argument("--template", help="chat template class (default: Llama3, or the recipe's)")
    p.add_argument(
        "--recipe",
        "--config",
        dest="recipe",
        help="a training recipe: its data settings (template, preprocessing, max_length, ...) "
        "and, when its model can be built here, the model's own tokenizer and media spec",
    )
    p.add_argument("--fast", action="store_true", help="read headers only, decode no media")
    p.add_argument("--image-tokens", type=int, default=576, help="stub: tokens per image")
    p.add_argument("--image-size", type=int, default=336, help="stub: image side")
    p.add_argument("--max-length", type=int, help="longest sample in tokens (default: 2048)")
    p.add_argument("--pack-tokens", type=int, help="packed row size (default: --max-length)")
    p.add_argument("--max-frames", type=int, help="frames sampled per video (default: 8)")
    p.add_argument("--fps", type=float, help="frames per second sampled from videos")
    p.add_argument("--labels", nargs="+", help="score names of scored records, in target order")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: 8)")
    p.add_argument("--buffer-size", type=int, help="samples packed together (default: 1024)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, help="the mixture seed (default: 0, or the recipe's)")
    p.add_argument("--root", help="media folder (default: each data file's folder)")
    p.add_argument("--allow-outside-root", action="store_true")
    p.add_argument("--no-check-media", action="store_true", help="neither stat nor decode media")
    p.add_argument("--bins", type=int, default=10, help="token histogram bins")
    p.add_argument("--show", type=int, default=50, help="bad records listed in the report")
    p.add_argument("--strict", action="store_true", help="exit with status 1 on a bad record")
    a, overrides = parser.parse_known_args(argv)
    if overrides and not a.recipe:
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (overrides need --recipe)")
    config = load_recipe(a.recipe, overrides) if a.recipe else {}
    recipe = recipe_data(config) if a.recipe else {}
    data = a.data or recipe.get("train")
    if data is None:
        parser.error("give DATA, or a --recipe with data.init_args.train")

    def pick(name: str, default):
        flag = getattr(a, name)
        return flag if flag is not None else recipe.get(name, default)

    template = a.template or recipe.get("template") or "lmm.data.templates.Llama3"
    max_length = pick("max_length", 2048)
    preprocessing = recipe.get("preprocessing")
    processor = None
    if a.recipe:
        template = template if isinstance(template, ChatTemplate) else load_template(template)
        processor = (
            model_processor(config, template, max_length, preprocessing, a.recipe)
            if model_processor is not None
            else None
        )
        if processor is not None and a.tokenizer:
            log.warning("--tokenizer %s is not used: the recipe's model gives its own", a.tokenizer)
    passed = ("image_tokens", "image_size", "split", "epoch", "bins", "show")
    report = check(
        data,
        processor=processor,
        tokenizer=a.tokenizer if processor is None else None,
        template=template,
        max_length=max_length,
        pack_tokens=pick("pack_tokens", None),
        preprocessing=preprocessing,
        max_frames=pick("max_frames", 8),
        fps=pick("fps", None),
        labels=pick("labels", None),
        fast=a.fast,
        batch_size=pick("batch_size", 8),
        buffer_size=pick("buffer_size", 1024),
        seed=pick("seed", 0),
        root=pick("root", None),
        allow_outside_root=a.allow_outside_root or bool(recipe.get("allow_outside_root")),
        check_media=not a.no_check_media,
        **{name: getattr(a, name) for name in passed},
    )
    if a.strict and report["total"]["bad"]:
        raise SystemExit(1)
    return report
