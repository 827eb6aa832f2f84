"""Processor and collator: media expansion, label masking, transforms, truncation, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.data.collate import PadCollator
from lmm.data.media import ImageTransform, expand_to_square
from lmm.data.processor import MediaSpec, Processor
from lmm.data.sample import BadRecordError, Media, Sample, Turn
from lmm.data.templates import Llama3
from lmm.data.tokenization import load_tokenizer


class _Spec(MediaSpec):
    """A media spec with 5 tokens per image and an 8 px transform."""

    transform = ImageTransform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")

    def num_image_tokens(self, image_size):
        assert image_size == (8, 8)
        return 5


@pytest.fixture
def processor(tiny_assets):
    tok = load_tokenizer(str(tiny_assets["tokenizer"]))
    return Processor(tok, Llama3(), _Spec(), max_length=128)


@pytest.fixture
def two_images(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (12, 6), colour).save(paths[-1])
    return paths


def _sample(images):
    return Sample(
        "s1",
        [
            Turn("user", [Media(0), " and ", Media(1), " same colour?"]),
            Turn("assistant", ["no"]),
            Turn("user", ["Sure?"]),
            Turn("assistant", ["yes"]),
        ],
        images,
    )


def test_each_marker_expands_and_labels_are_answers_only(processor, two_images):
    f = processor(_sample(two_images))
    tok = processor.tokenizer
    image_id = processor.image_token_id
    assert int((f.input_ids == image_id).sum()) == 10
    assert f.pixel_values.shape == (2, 3, 8, 8)
    trained = tok.decode(f.input_ids[f.labels != -100])
    assert trained == "no<|eot_id|>yes<|eot_id|>"
    assert (f.labels[f.input_ids == image_id] == -100).all()


def test_prompt_ends_with_assistant_header_and_keeps_reference(processor, two_images):
    f = processor.prompt(_sample(two_images))
    text = processor.tokenizer.decode(f.input_ids)
    assert text.endswith("Sure?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert f.reference == "yes"


def test_too_long_drops_whole_rounds_then_errors(processor, two_images):
    full = processor(_sample(two_images))
    processor.max_length = len(full.input_ids) - 1
    cut = processor(_sample(two_images))
    assert processor.tokenizer.decode(cut.input_ids[cut.labels != -100]) == "no<|eot_id|>"
    assert int((cut.input_ids == processor.image_token_id).sum()) == 10  # images never cut
    processor.max_length = 8
    with pytest.raises(BadRecordError, match="'s1'.*max_length=8"):
        processor(_sample(two_images))


def test_corrupt_image_names_the_sample(processor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    sample = Sample("broken", [Turn("user", [Media(0)]), Turn("assistant", ["x"])], [bad], "d.json")
    with pytest.raises(BadRecordError, match=r"'broken' \(d.json\).*cannot be read"):
        processor(sample)


def test_pad_transform_uses_mean_colour():
    img = Image.new("RGB", (4, 2), (255, 255, 255))
    square = expand_to_square(img, (10, 20, 30))
    px = np.asarray(square)
    assert square.size == (4, 4)
    assert tuple(px[0, 0]) == (10, 20, 30) and tuple(px[1, 0]) == (255, 255, 255)
    t = ImageTransform(4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")(img)
    assert t.shape == (3, 4, 4)
    assert torch.allclose(t[:, 0, 0], torch.zeros(3), atol=0.01)  # mean colour normalises to 0
    assert torch.allclose(t[:, 2, 2], torch.ones(3), atol=0.01)  # white → 1
    # the fill is LLaVA's int(mean * 255), truncated: 127 for 0.5, not 128
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    t = ImageTransform(4, clip_mean, (1 / 255, 1 / 255, 1 / 255), "pad")(img)
    fill = (t[:, 0, 0] + torch.tensor(clip_mean) * 255).round()  # undo (x/255 - mean) / std
    assert fill.tolist() == [122.0, 116.0, 104.0]


def test_collate_right_and_left_padding(processor, two_images):
    a = processor(_sample(two_images))
    b = processor(Sample("t", [Turn("user", ["hi"]), Turn("assistant", ["ok"])]))
    right = PadCollator(processor.tokenizer.pad_token_id, "right")([a, b])
    assert right.input_ids.shape == (2, len(a.input_ids))
    assert right.attention_mask[1].tolist() == [1] * len(b.input_ids) + [0] * (
        len(a.input_ids) - len(b.input_ids)
    )
    assert right.views_per_sample == [2, 0] and right.pixel_values.shape[0] == 2
    assert (right.labels[1, len(b.input_ids) :] == -100).all()
    left = PadCollator(processor.tokenizer.pad_token_id, "left")([a, b])
    assert left.input_ids[1, -len(b.input_ids) :].tolist() == b.input_ids.tolist()
    assert left.position_ids[1, -1].item() == len(b.input_ids) - 1
