"""The processor: Sample → Features (template, segment tokenization, media expansion, transforms)."""

from __future__ import annotations

from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lmm.data.batch import Features
from lmm.data.chat_template import render_text
from lmm.data.media import ImageTransform, load_image
from lmm.data.policy import DEFAULT, Preprocessing
from lmm.data.sample import IMAGE_MARKER, BadRecordError, Sample, Turn, VideoRef
from lmm.data.templates import ChatTemplate
from lmm.data.tokenization import IGNORE_INDEX, SegmentTokenizer
from lmm.data.video import VideoError, VideoReader, load_video, sample_indices

MediaMode = Literal["image", "multi", "video"]
"""How a media item is shown: the only image of its sample, one of several, or a video."""


class MediaSpec:
    """How a family turns a media item into pixels and placeholder tokens.

    The default (classic LLaVA, Q-Former): an image is one view, `transform(image)`, and a
    marker becomes `num_image_tokens` feature slots per view (per frame for a video). Families
    with tiles (OneVision anyres, Idefics2 splitting), pooled video frames or structural tokens
    around the features (Idefics2's `<fake_token_around_image>`, Fuyu's row breaks) override
    `views` and `marker_tokens`; the processor knows every token count before decoding.
    """

    transform: ImageTransform
    # True when `marker_tokens` depends on the original image size (anyres, Fuyu): the
    # processor then reads image headers to count tokens (never decoding pixels).
    size_dependent: bool = False
    # A token that both opens and closes a marker's expansion (Idefics2's
    # `<fake_token_around_image>`): where two expansions meet it is written once, as
    # transformers' processor writes it.
    boundary_token: str | None = None

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Feature slots one transformed view of (height, width) becomes."""
        raise NotImplementedError

    def views(self, image: Image.Image, mode: MediaMode) -> Tensor:
        """`[V, 3, H, W]`: the pixel views one image (or one video frame) becomes."""
        return self.transform(image)[None]

    def marker_tokens(
        self, image_size: tuple[int, int], mode: MediaMode, frames: int = 1
    ) -> list[str | None]:
        """What one marker becomes: `None` is a feature slot, a string a token of the tokenizer.

        `image_size` is the original (height, width) of the image or of the video's frames,
        `frames` the frame count of a video (1 for an image).
        """
        size = (self.transform.size, self.transform.size)
        return [None] * (self.num_image_tokens(size) * frames)


def _rounds(turns: list[Turn]) -> list[list[Turn]]:
    """Split turns into a leading system group and user→assistant rounds."""
    rounds: list[list[Turn]] = []
    for turn in turns:
        if turn.role == "user" or not rounds:
            rounds.append([turn])
        else:
            rounds[-1].append(turn)
    return rounds


class Processor:
    """Renders a sample with a chat template and tokenizes it segment by segment.

    Each image marker becomes exactly `media.num_image_tokens(...)` image tokens (label -100);
    labels are the ids of trainable segments only (plus the template's `train_tokens`). By
    default a sample longer than `max_length` loses whole rounds from the end (never part of a
    turn, never part of an image); if even one round is too long it is a bad record. `policy`
    (lmm.data.policy.Preprocessing) gives the seeds' other truncations and quirks.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        media: MediaSpec,
        max_length: int = 2048,
        image_token: str = IMAGE_MARKER,
        policy: Preprocessing | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.media = media
        self.max_length = max_length
        self.policy = policy or DEFAULT
        self.segments = SegmentTokenizer(
            tokenizer,
            image_token,
            self.policy.tokenization,
            self.policy.sentencepiece,
            self.policy.strip_special,
        )
        self.image_token_id = self.segments.image_token_id
        self.train_ids = {self._single_id(t, "train_tokens") for t in template.train_tokens}
        self.drop_ids = {self._single_id(t, "drop_tokens") for t in self.policy.drop_tokens}
        self.mask_ids = {self._single_id(t, "mask_tokens") for t in self.policy.mask_tokens}
        boundary = media.boundary_token
        self.boundary_id = None if boundary is None else tokenizer.convert_tokens_to_ids(boundary)
        self.video_reader = VideoReader()

    def __call__(self, sample: Sample) -> Features:
        """Features for training: every turn that fits, trainable assistant text labelled.

        A scored sample (`sample.target`, e.g. VideoScore) is a prompt with no answer: it is
        rendered up to the assistant header and its target goes with it.
        """
        if sample.target is not None:
            features = self._encode(sample, sample.turns, add_generation_prompt=True)
            features.target = torch.tensor(sample.target, dtype=torch.float32)
            return features
        return self._encode(sample, self._train_turns(sample), add_generation_prompt=False)

    def length(self, sample: Sample) -> int:
        """The token count `__call__` gives, computed without decoding an image or a video."""
        scored = sample.target is not None
        turns = sample.turns if scored else self._train_turns(sample)
        _, ids, _, media = self._sequence(sample, turns, add_generation_prompt=scored)
        expansions = [self._header_expansion(sample, index) for index in media]
        out_ids, _ = self._expand(ids, ids, expansions)
        if self.policy.truncation == "refuse" and not scored:
            self._refuse_long(sample, len(out_ids))
        if self.policy.truncation == "cut_tail" and not scored:
            out_ids = self._cut_expanded(sample, out_ids, out_ids)[0]
        return len(out_ids)

    def feature_slots(self, sample: Sample) -> int:
        """How many of the sample's tokens are media features (the image token, one per
        feature the vision side hands the LLM), known from file headers as `length` is; rounds
        that truncation drops still count (an upper bound for long samples)."""
        return sum(
            self.media.marker_tokens(*self._marker_args(sample, index)).count(None)
            for index in range(len(sample.images))
        )

    def _marker_args(self, sample: Sample, index: int) -> tuple:
        """`MediaSpec.marker_tokens`'s (size, mode, frames) for media `index`, from its header."""
        mode = self._mode(sample, index)
        frames = self._num_frames(sample, index)
        size = self._header_size(sample, index) if self.media.size_dependent else None
        return size or (self.media.transform.size, self.media.transform.size), mode, frames

    def _train_turns(self, sample: Sample) -> list[Turn]:
        """The turns a training sample renders: those that fit (`drop_rounds`), else all."""
        if self.policy.truncation == "drop_rounds":
            return self._fit(sample)
        return sample.turns

    def prompt(self, sample: Sample) -> Features:
        """Features for generation: turns up to the last user turn plus the assistant header.

        The reference is the text of the last assistant turn, if the sample has one.
        """
        turns = list(sample.turns)
        reference = None
        if turns and turns[-1].role == "assistant":
            reference = turns.pop().text
        if not turns or turns[-1].role != "user":
            raise BadRecordError(sample.source, sample.id, "no user turn to answer")
        features = self._encode(sample, turns, add_generation_prompt=True)
        features.reference = reference
        features.stop_strings = tuple(self.template.stop_strings)
        if sample.target is not None:  # scored samples keep their target for test metrics
            features.target = torch.tensor(sample.target, dtype=torch.float32)
        return features

    def _fit(self, sample: Sample) -> list[Turn]:
        """The turns that fit in `max_length`: whole rounds dropped from the end if needed."""
        rounds = _rounds(sample.turns)
        while True:
            turns = [t for r in rounds for t in r]
            _, ids, _, media = self._sequence(sample, turns, add_generation_prompt=False)
            n = self._expanded_length(sample, media, ids)
            if n <= self.max_length:
                return turns
            if sum(r[0].role == "user" for r in rounds) <= 1:
                raise BadRecordError(
                    sample.source,
                    sample.id,
                    f"{n} tokens in its first round, more than max_length={self.max_length}",
                    "raise max_length, use fewer or smaller images, or drop the record",
                )
            rounds = rounds[:-1]

    def _expanded_length(self, sample: Sample, media: list[int], ids: list[int]) -> int:
        expansions = [self._header_expansion(sample, index) for index in media]
        return len(self._expand(ids, ids, expansions)[0])

    def _header_expansion(self, sample: Sample, index: int) -> list[int]:
        """The token ids media `index` becomes, known from its file header alone."""
        return self._marker_ids(sample, self.media.marker_tokens(*self._marker_args(sample, index)))

    def _refuse_long(self, sample: Sample, n: int) -> None:
        """`truncation: refuse`: a sample longer than `max_length` is a bad record."""
        if n > self.max_length:
            raise BadRecordError(
                sample.source,
                sample.id,
                f"{n} tokens, more than max_length={self.max_length} (truncation: refuse)",
                "raise max_length, or choose another preprocessing.truncation",
            )

    def _cut_expanded(
        self, sample: Sample, ids: list[int], labels: list[int]
    ) -> tuple[list[int], list[int]]:
        """`cut_tail`: the expanded sequence cut at `max_length`, never inside a media item."""
        n = self.max_length
        if len(ids) <= n:
            return ids, labels
        if ids[n - 1] == self.image_token_id and ids[n] == self.image_token_id:
            raise BadRecordError(
                sample.source,
                sample.id,
                f"cutting it at max_length={n} tokens would cut an image's tokens apart (the "
                "seed feeds the first part of its features; lmm feeds whole media only)",
                "raise max_length, or use truncation: drop_rounds",
            )
        return ids[:n], labels[:n]

    def _expand(
        self, ids: list[int], labels: list[int], expansions: list[list[int]]
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels with each image marker replaced by its expansion (label -100)."""
        it = iter(expansions)
        out_ids: list[int] = []
        out_labels: list[int] = []
        for tok, lab in zip(ids, labels, strict=True):
            if tok != self.image_token_id:
                out_ids.append(tok)
                out_labels.append(lab)
                continue
            expansion = next(it)
            if self.boundary_id is not None and out_ids and expansion:
                if out_ids[-1] == self.boundary_id == expansion[0]:
                    expansion = expansion[1:]  # adjacent markers share their boundary token
            out_ids += expansion
            out_labels += [-100] * len(expansion)
        return out_ids, out_labels

    @staticmethod
    def _mode(sample: Sample, index: int) -> MediaMode:
        if isinstance(sample.images[index], VideoRef):
            return "video"
        images = sum(not isinstance(m, VideoRef) for m in sample.images)
        return "multi" if images > 1 else "image"

    def _header_size(self, sample: Sample, index: int) -> tuple[int, int]:
        """(height, width) of an image or a video's frames, from the file header only."""
        item = sample.images[index]
        try:
            if isinstance(item, VideoRef):
                info = self.video_reader.info(item.path)
                return info.height, info.width
            with Image.open(item) as img:
                return img.height, img.width
        except FileNotFoundError as err:
            raise BadRecordError(
                sample.source, sample.id, f"media {index} not found: {err}"
            ) from err
        except Exception as err:  # PIL and the video readers raise several types
            raise BadRecordError(
                sample.source, sample.id, f"media {index} cannot be read: {err}"
            ) from err

    def _num_frames(self, sample: Sample, index: int) -> int:
        """Images a media marker becomes: 1, or the frames sampled from its video (header only)."""
        item = sample.images[index]
        if not isinstance(item, VideoRef):
            return 1
        try:
            info = self.video_reader.info(item.path)
        except (VideoError, OSError) as err:
            raise BadRecordError(sample.source, sample.id, f"cannot read video: {err}") from err
        n = len(sample_indices(info.num_frames, info.avg_fps, **item.sampling))
        if n < item.min_frames:
            raise BadRecordError(
                sample.source,
                sample.id,
                f"video {item.path} gives {n} frames but min_frames={item.min_frames}",
                "drop the record, or lower min_frames / raise fps",
            )
        return n

    def _tokens(self, sample: Sample, turns: list[Turn], add_generation_prompt: bool):
        try:
            segments = self.template.render(turns, add_generation_prompt=add_generation_prompt)
        except ValueError as err:
            raise BadRecordError(sample.source, sample.id, str(err)) from err
        ids, labels = self.segments.encode(segments)
        if self.train_ids:
            labels = [i if i in self.train_ids else lab for i, lab in zip(ids, labels, strict=True)]
        if self.policy.answer_max_tokens is not None:
            ids, labels = _cap_answers(ids, labels, self.policy.answer_max_tokens)
        return segments, ids, labels

    def _sequence(self, sample: Sample, turns: list[Turn], add_generation_prompt: bool):
        """Segments, ids and labels before media expansion, and the media indices they keep.

        The order is the seeds': the text cut (`cut_tail_text`, a marker counting one token)
        comes before tokens are dropped (`drop_tokens`), as the LLaVA-Phi collator cuts
        before the model drops the masked positions.
        """
        segments, ids, labels = self._tokens(sample, turns, add_generation_prompt)
        media = [s.media for s in segments if s.media is not None]
        generating = add_generation_prompt and sample.target is None
        if self.policy.truncation == "cut_tail_text" and not generating:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            media = media[: ids.count(self.image_token_id)]
        if self.drop_ids:
            keep = [k for k, i in enumerate(ids) if i not in self.drop_ids]
            ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
        return segments, ids, labels, media

    def _encode(self, sample: Sample, turns: list[Turn], add_generation_prompt: bool) -> Features:
        segments, ids, labels, media = self._sequence(sample, turns, add_generation_prompt)
        pixels: list[Tensor] = []
        markers: list[list[int]] = []
        sizes: list[tuple[int, int]] = []
        modes: list[str] = []
        views: list[int] = []
        for index in media:
            mode = self._mode(sample, index)
            images = self._media(sample, index)
            size = (images[0].height, images[0].width)
            item = torch.cat([self.media.views(im, mode) for im in images])
            pixels.append(item)
            sizes.append(size)
            modes.append(mode)
            views.append(item.shape[0])
            tokens = self.media.marker_tokens(size, mode, len(images))
            markers.append(self._marker_ids(sample, tokens))
        out_ids, out_labels = self._expand(ids, labels, markers)
        if self.policy.truncation == "cut_tail" and not add_generation_prompt:
            out_ids, out_labels = self._cut_expanded(sample, out_ids, out_labels)
        if self.policy.truncation == "refuse" and not add_generation_prompt:
            self._refuse_long(sample, len(out_ids))
        attention = None
        # a training collator's quirk: prompts for generation attend to every token, as the
        # seeds' own inference does (it passes no attention mask)
        training = not add_generation_prompt or sample.target is not None
        if training and self.mask_ids and any(i in self.mask_ids for i in out_ids):
            attention = torch.tensor([int(i not in self.mask_ids) for i in out_ids])
        return Features(
            id=sample.id,
            input_ids=torch.tensor(out_ids, dtype=torch.long),
            labels=torch.tensor(out_labels, dtype=torch.long),
            pixel_values=torch.cat(pixels) if pixels else None,
            meta=dict(sample.meta),
            image_sizes=sizes,
            media_modes=modes,
            views_per_media=views,
            attention_mask=attention,
            prompt=render_text(segments) if add_generation_prompt else None,
        )

    def _single_id(self, token: str, option: str) -> int:
        """The id of `token`, which must be one token of the tokenizer (`option` names it)."""
        ids = self.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"{option}: {token!r} is {len(ids)} tokens ({ids}) for this tokenizer, not one; "
                "name tokens the tokenizer has"
            )
        return ids[0]

    def _marker_ids(self, sample: Sample, tokens: list[str | None]) -> list[int]:
        """The ids of a marker's tokens (`None`: the image token, a feature slot); each
        distinct token is looked up once, however many times the expansion repeats it."""
        ids: dict[str | None, int] = {None: self.image_token_id}
        for token in set(tokens) - {None}:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise ValueError(
                    f"the model's media tokens include {token!r}, which the tokenizer does not "
                    f"have (record {sample.id} of {sample.source}); add it as a special token"
                )
            ids[token] = tid
        return [ids[t] for t in tokens]

    def _media(self, sample: Sample, index: int) -> list[Image.Image]:
        """The images of one media marker: an image, or a video's sampled frames."""
        return load_media(sample, index, self.video_reader)


def load_media(sample: Sample, index: int, reader: VideoReader | None = None) -> list[Image.Image]:
    """The 8-bit RGB images of media `index` of a sample, decoded as training decodes them: an
    image (`lmm.data.media.load_image`, its budgets checked), or a video's sampled frames
    (`lmm.data.video.load_video`). A missing, broken or refused file raises BadRecordError."""
    item = sample.images[index]
    if isinstance(item, VideoRef):
        return load_video(
            item.path,
            **item.sampling,
            min_frames=item.min_frames,
            reader=reader,
            source=sample.source,
            record_id=sample.id,
        )
    try:
        return [load_image(item)]
    except FileNotFoundError as err:
        raise BadRecordError(sample.source, sample.id, f"image {index} not found: {item}") from err
    except Exception as err:  # PIL raises several types for corrupt files
        raise BadRecordError(
            sample.source, sample.id, f"image {index} ({item}) cannot be read: {err}"
        ) from err


def _cap_answers(ids: list[int], labels: list[int], cap: int) -> tuple[list[int], list[int]]:
    """Each run of trained tokens (an answer and its terminator) cut to its first `cap` tokens."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    run = 0
    for tok, lab in zip(ids, labels, strict=True):
        run = run + 1 if lab != IGNORE_INDEX else 0
        if run > cap:
            continue
        out_ids.append(tok)
        out_labels.append(lab)
    return out_ids, out_labels
