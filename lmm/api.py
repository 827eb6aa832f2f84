"""`lmm.load(...)`: a trained model and its chat template, answering messages (`LMM.generate`).

`lmm chat` and `LMM.evaluate` use the same object; answers come from `LMMModule.generate`, the
batched, batch-invariant generation `lmm test` uses, so a reply here equals the one scored.

    model = lmm.load("runs/quickstart/version_0/checkpoints/<name>.ckpt")
    model.generate([{"role": "user", "content": "<image>\\nWhat colour is the shape?"}],
                   images=["shape.png"])
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from lmm.data.batch import Batch
from lmm.data.collate import PadCollator
from lmm.data.datamodule import ChatDataModule
from lmm.data.media import media_kind
from lmm.data.processor import Processor
from lmm.data.sample import IMAGE_MARKER, Media, Part, Sample, Turn, VideoRef
from lmm.data.templates import ChatTemplate, build_template
from lmm.evaluation.runner import Task
from lmm.families.hf import import_transformers
from lmm.generation.decode import cut_at_stop
from lmm.training.module import LMMModule
from lmm.training.recipe import build_module, load_weights
from lmm.utils.logging import get_logger

log = get_logger(__name__)

VIDEO_MARKER = "<video>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")

Message = Mapping[
    str, Any
]  # {"role": ..., "content": str | [{"type": "text"|"image"|"video", ...}]}


class LMM:
    """A model with its processor: `generate` / `stream` answers to chat messages, `evaluate` tasks."""

    def __init__(
        self,
        module: LMMModule,
        template: ChatTemplate,
        max_length: int = 4096,
        max_frames: int = 8,
        fps: float | None = None,
    ):
        """
        Args:
            module: the model (any family's LMMModule), weights loaded.
            template: the chat template the model was trained with.
            max_length: longest prompt in tokens.
            max_frames: frames sampled from each video.
            fps: sample videos at this many frames per second (at most `max_frames`).
        """
        self.module = module.eval()
        self.template = template
        self.max_length = max_length
        self.max_frames = max_frames
        self.fps = fps
        self.processor = Processor(
            module.tokenizer, template, module.media_spec(), max_length, module.image_token
        )
        self.collate = PadCollator(module.tokenizer.pad_token_id, "left")

    @property
    def device(self) -> torch.device:
        return self.module.device

    def to(self, device: str | torch.device) -> LMM:
        self.module.to(device)
        return self

    # --- messages → batches -------------------------------------------------------------
    def sample(self, messages: Sequence[Message], images: Sequence | None = None) -> Sample:
        """A `Sample` of chat messages whose `<image>`/`<video>` markers take `images` in order.

        `content` is a string with markers, or a list of parts `{"type": "text", "text": ...}`,
        `{"type": "image", "image": path}`, `{"type": "video", "video": path}`. With no marker at
        all, the images go first in the first user message.
        """
        queue = [Path(p) for p in images or []]
        media: list[Path | VideoRef] = []
        turns: list[Turn] = []
        for k, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            parts: list[Part] = []
            pieces = _parts(content, k)
            for kind, value in pieces:
                if kind == "text":
                    if value:
                        parts.append(value)
                    continue
                if value is None:
                    if not queue:
                        raise ValueError(
                            f"message {k} has more {IMAGE_MARKER}/{VIDEO_MARKER} markers than the "
                            f"{len(images or [])} images given"
                        )
                    value = queue.pop(0)
                parts.append(Media(len(media)))
                media.append(self._media(Path(value), kind))
            turns.append(Turn(role, parts))
        if queue:
            if media:
                raise ValueError(
                    f"{len(media) + len(queue)} images given but the messages hold {len(media)} "
                    f"markers; put one {IMAGE_MARKER} per image, or none"
                )
            first = next((t for t in turns if t.role == "user"), None)
            if first is None:
                raise ValueError("images given but there is no user message to attach them to")
            leading: list[Part] = []
            for path in queue:
                leading += [Media(len(media)), "\n"]
                media.append(self._media(path, media_kind(path)))
            first.parts[:0] = leading
        for item in media:
            path = item.path if isinstance(item, VideoRef) else item
            if not path.is_file():
                raise FileNotFoundError(f"media file {path} does not exist")
        return Sample("chat", turns, media, source="<messages>")

    def _media(self, path: Path, kind: str) -> Path | VideoRef:
        if kind == "video":
            return VideoRef(path, max_frames=self.max_frames, fps=self.fps)
        return path

    def batch(self, conversations: Sequence[Sample]) -> Batch:
        """Left-padded generation batch of samples (prompt up to the assistant header)."""
        features = [self.processor.prompt(s) for s in conversations]
        return self.collate(features).to(self.device)

    # --- answers ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        images: Sequence | Sequence[Sequence] | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str | list[str]:
        """The reply to one conversation (a list of messages), or to each of a list of them.

        Greedy unless `temperature` > 0; with `seed`, sampling is reproducible and does not
        depend on which other conversations share the batch.
        """
        single = bool(messages) and isinstance(messages[0], Mapping)
        conversations = [messages] if single else list(messages)
        media = [images] if single else list(images or [None] * len(conversations))
        samples = [self.sample(c, m) for c, m in zip(conversations, media, strict=True)]
        for i, s in enumerate(samples):
            s.id = str(i)
        answers = self.module.generate(
            self.batch(samples),
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return answers[0] if single else answers

    @torch.no_grad()
    def stream(
        self,
        messages: Sequence[Message],
        images: Sequence | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """The reply to one conversation, piece by piece as it is generated (pieces join to it)."""
        sample = self.sample(messages, images)
        sample.id = "0"  # as `generate` numbers a lone conversation: a seeded reply is the same
        batch = self.batch([sample])
        stops = self.module.generator.stops(batch)
        tokens: list[int] = []
        shown = 0
        for step in self.module.generation_stream(
            batch, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        ):
            if step.tokens[0] is not None:
                tokens.append(step.tokens[0])
            text = self.module.tokenizer.decode(tokens, skip_special_tokens=False)
            cut = cut_at_stop(text, stops)
            safe = _safe_prefix(cut, stops) if len(cut) == len(text) else cut
            if len(safe) > shown:
                yield safe[shown:]
                shown = len(safe)
        text = cut_at_stop(self.module.tokenizer.decode(tokens, skip_special_tokens=False), stops)
        if len(text) > shown:
            yield text[shown:]

    @torch.no_grad()
    def evaluate(self, task: Task, batch_size: int = 16) -> dict[str, float]:
        """Score a benchmark task as `lmm test` does (same prompts, generation and metric)."""
        data = ChatDataModule(template=self.template, eval_batch_size=batch_size)
        data.connect(self.module.tokenizer, self.module.media_spec(), self.module.image_token)
        task.reset()
        loader = data.task_loader(task)
        for batch in tqdm(loader, desc=task.name, unit="batch", disable=None):  # bar on a TTY
            batch = batch.to(self.device)
            answers = self.module.generate(batch, task.max_new_tokens)
            task.update(answers, batch, self.template)
        results = task.compute()
        task.reset()
        return results


def _parts(content, k: int) -> list[tuple[str, Any]]:
    """`(kind, value)` pieces of a message's content: text, or media (value None = next image)."""
    if isinstance(content, str):
        out: list[tuple[str, Any]] = []
        for piece in _MARKERS.split(content):
            if piece == IMAGE_MARKER:
                out.append(("image", None))
            elif piece == VIDEO_MARKER:
                out.append(("video", None))
            elif piece:
                out.append(("text", piece))
        return out
    if isinstance(content, Sequence):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                out.append(("text", part.get("text", "")))
            elif kind in ("image", "video"):
                out.append((kind, part.get(kind) or part.get("path")))
            else:
                raise ValueError(
                    f"message {k}: content part {part!r} is not "
                    '{"type": "text"|"image"|"video", ...}'
                )
        return out
    raise ValueError(f"message {k}: content must be a string or a list of parts, got {content!r}")


def _safe_prefix(text: str, stops: Sequence[str]) -> str:
    """`text` without a tail that may still become a stop string or an incomplete character."""
    text = text.rstrip("\ufffd")
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                return text[:-n]
    return text


# ------------------------------------------------------------------------------- loading


def load(
    checkpoint_or_recipe: str | Path,
    recipe: str | Path | None = None,
    *,
    template: ChatTemplate | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LMM:
    """Load a model: a lmm `.ckpt` (+ its recipe), a recipe alone, a `lmm convert` folder, or a
    transformers folder or hub id.

    Args:
        checkpoint_or_recipe: a Lightning checkpoint of `lmm fit` (`.ckpt` or `.safetensors`), a
            recipe YAML (weights from the paths it names), a folder written by
            `lmm convert import` (with `lmm.yaml`), or a transformers folder or hub id of
            LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
            Idefics2ForConditionalGeneration, FuyuForCausalLM or
            Qwen2_5_VLForConditionalGeneration (imported once into a cache; the chat template
            is the lmm template whose prompt equals the folder's, see docs/convert.md).
        recipe: the recipe the checkpoint was trained with (default: the `config.yaml` that
            `lmm fit` saved in the run folder above the checkpoint).
        template: the chat template (class, class path or instance; default: the recipe's
            `data.init_args.template`).
        overrides: recipe values to replace, by dotted key as on the command line, e.g.
            `{"model.init_args.tokenizer": "assets/tiny/tokenizer"}`.
        device: where the model runs.
    """
    path = Path(checkpoint_or_recipe)
    checkpoint: Path | None = None
    lmm_file = path.suffix in (".ckpt", ".safetensors", ".yaml", ".yml")
    if (not path.exists() and not lmm_file) or (
        path.is_dir() and not (path / "lmm.yaml").is_file()
    ):
        # a transformers folder or hub id: its cached import (errors name what it is)
        path = import_transformers(checkpoint_or_recipe)
    elif path.is_dir():  # an import: its lmm.yaml builds the model with every imported weight
        path = path / "lmm.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or recipe at {path}")
    if path.suffix in (".yaml", ".yml"):
        recipe = recipe or path
    else:
        checkpoint = path
        recipe = recipe or find_recipe(path)
    config: dict = yaml.safe_load(Path(recipe).read_text()) or {}
    for key, value in (overrides or {}).items():
        _set_dotted(config, key, value)
    module = build_module(config, where=str(recipe))
    if checkpoint is not None:
        load_weights(module, checkpoint, str(recipe))
    data = (config.get("data") or {}).get("init_args") or {}
    chosen = template if template is not None else data.get("template")
    if chosen is None:
        raise ValueError(
            f"no chat template: {recipe or path} has no data.init_args.template; pass template= "
            "(e.g. 'lmm.data.templates.Llama3')"
        )
    model = LMM(
        module,
        build_template(chosen),
        max_length=int(data.get("max_length") or 4096),
        max_frames=int(data.get("max_frames") or 8),
        fps=data.get("fps"),
    )
    return model.to(device)


def find_recipe(checkpoint: Path) -> Path:
    """The `config.yaml` `lmm fit` saved in the run folder above `checkpoint`; for a seed
    recipe's `runs/<name>/last.ckpt` (its ModelCheckpoint's dirpath), the newest
    `runs/<name>/version_N/config.yaml` (the run that wrote it last)."""
    looked = []
    for parent in list(checkpoint.resolve().parents)[:3]:
        candidate = parent / "config.yaml"
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate
    versions = sorted(
        checkpoint.resolve().parent.glob("version_*/config.yaml"), key=lambda p: p.stat().st_mtime
    )
    looked.append(str(checkpoint.resolve().parent / "version_*" / "config.yaml"))
    if versions:
        log.info("recipe of %s: %s (the newest run in its folder)", checkpoint, versions[-1])
        return versions[-1]
    raise FileNotFoundError(
        f"no recipe for checkpoint {checkpoint}: looked for {looked}; pass recipe= "
        "(the --config the checkpoint was trained with)"
    )


def _set_dotted(config: dict, key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section of the recipe")
    node[parts[-1]] = value


def add_model_arguments(parser) -> None:
    """The model a front-end loads (`lmm chat`, `lmm serve`, `lmm web`): MODEL, --recipe,
    --template, --device, as `load` takes them (`load_from_arguments`)."""
    parser.add_argument(
        "model",
        help="a .ckpt of `lmm fit`, a recipe YAML, an imported folder, or a transformers folder "
        "or hub id (Llava, LLaVA-OneVision, Idefics2, Fuyu, Qwen2.5-VL)",
    )
    parser.add_argument("--recipe", help="the checkpoint's recipe (default: its run's config.yaml)")
    parser.add_argument("--template", help="chat template class path (default: the recipe's)")
    parser.add_argument("--device", default="cpu")


def load_from_arguments(args, overrides: Mapping[str, Any] | None = None) -> LMM:
    """`load` with the arguments `add_model_arguments` added."""
    return load(
        args.model, args.recipe, template=args.template, overrides=overrides, device=args.device
    )
