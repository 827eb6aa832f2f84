"""The Fuyu family: transformers' FuyuForCausalLM logits and FuyuProcessor's image text and pixels,
import/export of the transformers layout, generation, and the Mantis-Fuyu recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, FuyuForCausalLM, FuyuProcessor
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

from lmm.convert import load_imported
from lmm.data.collate import PadCollator
from lmm.data.processor import Processor
from lmm.data.sample import Media, Sample, Turn
from lmm.data.templates import MantisFuyu, render_text, trainable_text
from lmm.families.fuyu import FuyuImageTransform, FuyuMediaSpec
from lmm.families.fuyu.convert import export_hf, import_checkpoint
from lmm.families.fuyu.model import IMAGE_TOKEN, NEWLINE_TOKEN
from tests.builders import (
    FUYU_CANVAS,
    FUYU_PATCH,
    build_fuyu_tokenizer,
    build_tiny_fuyu,
    fuyu_hf_inputs,
    fuyu_image_processor,
)
from tests.helpers import cpu_fit_args

CANVAS, PATCH = FUYU_CANVAS, FUYU_PATCH  # (height, width) images are fitted into; patch side
# (height, width): shrunk to 19x32 (5 rows of 8, the last row half padding), kept as is
# (4 rows of 6, partial patches), shrunk to 24x12 (a tall image)
SIZES = [(30, 50), (13, 21), (40, 20)]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def fuyu_tokenizer(tiny_assets, tmp_path_factory) -> Path:
    """The tiny tokenizer with Fuyu's `|SPEAKER|` and `|NEWLINE|` (Mantis's tokens left out)."""
    return build_fuyu_tokenizer(tiny_assets["tokenizer"], tmp_path_factory.mktemp("fuyu_tok"))


@pytest.fixture(scope="module")
def fuyu(fuyu_tokenizer, tmp_path_factory):
    """(transformers model, its lmm import folder, the LMMModule built from that folder)."""
    root = tmp_path_factory.mktemp("fuyu")
    hf = build_tiny_fuyu(root / "hf", fuyu_tokenizer)
    import_checkpoint(root / "hf", root / "lmm")
    return hf, root / "lmm", load_imported(root / "lmm").eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("fuyu_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _samples(images: list[Path]) -> list[Sample]:
    return [
        Sample(
            "one",
            [Turn("user", [Media(0), "what colour is it?"]), Turn("assistant", ["red"])],
            images=[images[0]],
        ),
        Sample(
            "two",
            [
                Turn("user", [Media(0), Media(1), "are they the same?"]),
                Turn("assistant", ["no"]),
            ],
            images=[images[1], images[2]],
        ),
    ]


def test_fuyu_against_hf(fuyu, images):
    hf, _, module = fuyu
    processor = Processor(module.tokenizer, MantisFuyu(), module.media_spec(), 512, IMAGE_TOKEN)
    samples = _samples(images)
    features = [processor(s) for s in samples]
    # the token count read from image headers equals the one of the decoded images
    assert [processor.length(s) for s in samples] == [len(f.input_ids) for f in features]
    batch = PadCollator(module.tokenizer.pad_token_id)(features)
    assert batch.views_per_sample == [1, 2] and batch.image_sizes.tolist() == [
        list(s) for s in SIZES
    ]

    canvases, patches = fuyu_hf_inputs(images)
    assert torch.equal(batch.pixel_values, canvases)  # lmm's pixels are the image processor's
    slots = (batch.input_ids == hf.config.image_token_id).sum(1).tolist()
    assert slots == [40, 24 + 18] == [len(patches[0]), len(patches[1]) + len(patches[2])]
    newline = module.tokenizer.convert_tokens_to_ids(NEWLINE_TOKEN)
    assert (batch.input_ids == newline).sum(1).tolist() == [5, 4 + 6]

    with torch.no_grad():
        ours = module(batch)
        theirs = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=torch.cat(patches)[None],  # [1, P, 3 * p * p], the batch's in order
        ).logits
    real = batch.attention_mask.bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)

    # the patches matter, and in their order: reversing each image's patch order changes logits
    with torch.no_grad():
        flipped = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=torch.cat([p.flip(0) for p in patches])[None],
        ).logits
    assert not torch.allclose(flipped[real], ours[real], atol=1e-4)


@pytest.mark.parametrize("size", [(30, 50), (13, 21), (40, 20), (24, 32), (5, 7), (100, 33)])
def test_image_text_and_pixels_match_fuyu_processor(size, fuyu_tokenizer):
    tok = AutoTokenizer.from_pretrained(fuyu_tokenizer)
    ip = fuyu_image_processor()
    fuyu_processor = FuyuProcessor(image_processor=ip, tokenizer=tok)
    spec = FuyuMediaSpec(FuyuImageTransform(*CANVAS), PATCH)  # Fuyu's: patches, then <s>
    h, w = size
    rng = np.random.default_rng(h * 1000 + w)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    out = ip([image])
    new_h = min(CANVAS[0], math.ceil(out["image_unpadded_heights"][0][0] / PATCH) * PATCH)
    new_w = min(CANVAS[1], math.ceil(out["image_unpadded_widths"][0][0] / PATCH) * PATCH)
    expected = fuyu_processor.replace_image_token(
        out, 0, num_patches=ip.get_num_patches(new_h, new_w), row_width=new_w // PATCH
    )
    tokens = spec.marker_tokens(size, "image")
    assert "".join(IMAGE_TOKEN if t is None else t for t in tokens) == expected
    # FuyuProcessor's own count for the size: placeholders and row breaks (without the <s>)
    counted = fuyu_processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens[0]
    assert len(tokens) - 1 == counted
    assert spec.num_image_tokens(size) == tokens.count(None) == (new_h // PATCH) * (new_w // PATCH)
    # a video's frames: the image text once per frame
    assert spec.marker_tokens(size, "video", frames=3) == tokens * 3
    # the pixels: resized, padded and normalised bit for bit as the image processor does
    assert torch.equal(spec.views(image, "image")[0], torch.from_numpy(out["images"][0][0]))


def test_mantis_fuyu_template():
    turns = [
        Turn("user", [Media(0), Media(1), "Same?"]),
        Turn("assistant", ["No."]),
        Turn("user", ["Why?"]),
        Turn("assistant", ["Colours."]),
    ]
    segments = MantisFuyu(system="S").render(turns)
    assert render_text(segments) == (
        "<s>S\nUSER: image 0: <image>image 1: <image>Same?<0x04>ASSISTANT: No.|ENDOFTEXT|"
        "USER: Why?<0x04>ASSISTANT: Colours.|ENDOFTEXT|"
    )
    assert trainable_text(segments) == " No.|ENDOFTEXT| Colours.|ENDOFTEXT|"
    prompt = MantisFuyu(system="S", image_text="{image}").render(
        turns[:1], add_generation_prompt=True
    )
    assert render_text(prompt) == "<s>S\nUSER: <image><image>Same?<0x04>ASSISTANT:"


def test_fuyu_generates_as_hf(fuyu, images):
    """Greedy answers of a left-padded prompt batch equal transformers' one prompt at a time."""
    hf, _, module = fuyu
    processor = Processor(module.tokenizer, MantisFuyu(), module.media_spec(), 512, IMAGE_TOKEN)
    samples = _samples(images)
    prompts = [processor.prompt(s) for s in samples]
    batch = PadCollator(module.tokenizer.pad_token_id, "left")(prompts)
    n_new = 4
    with torch.no_grad():
        ours: list[list[int]] = [[] for _ in samples]
        for step in module.generation_stream(batch, max_new_tokens=n_new):
            for row, token in zip(step.rows, step.tokens, strict=True):
                if token is not None:
                    ours[row].append(token)
        _, patches = fuyu_hf_inputs(images)
        per_sample = [patches[0], torch.cat(patches[1:])]
        for prompt, pixels, answer in zip(prompts, per_sample, ours, strict=True):
            ids = prompt.input_ids[None]
            theirs = []
            for _ in range(n_new):
                logits = hf(input_ids=ids, pixel_values=pixels[None]).logits[0, -1]
                theirs.append(int(logits.argmax()))
                ids = torch.cat([ids, torch.tensor([[theirs[-1]]])], dim=1)
            assert answer == theirs[: len(answer)] and answer
            if len(answer) < n_new:  # stopped early: at an end token
                assert answer[-1] == module.tokenizer.eos_token_id


def test_import_fuyu(fuyu_tokenizer, images, tiny_assets, tmp_path):
    hf = build_tiny_fuyu(tmp_path / "hf", fuyu_tokenizer, seed=1)
    keys = load_file(tmp_path / "hf" / "model.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_embed_tokens"}

    recipe = import_checkpoint(tmp_path / "hf", tmp_path / "lmm")
    llm_config = json.loads((tmp_path / "lmm" / "llm" / "config.json").read_text())
    assert llm_config["model_type"] == "persimmon"
    assert llm_config["architectures"] == ["PersimmonForCausalLM"]
    patch = load_file(tmp_path / "lmm" / "patch_embedding.safetensors")
    assert torch.equal(patch["weight"], hf.model.vision_embed_tokens.weight)
    args = yaml.safe_load(recipe.read_text())["model"]["init_args"]["model"]["init_args"]
    # the canvas and patch size of the checkpoint's preprocessor_config.json
    assert (args["image_height"], args["image_width"], args["patch_size"]) == (*CANVAS, PATCH)

    module = load_imported(tmp_path / "lmm").eval()
    processor = Processor(module.tokenizer, MantisFuyu(), module.media_spec(), 512, IMAGE_TOKEN)
    sample = _samples(images)[0]
    batch = PadCollator(module.tokenizer.pad_token_id)([processor(sample)])
    _, patches = fuyu_hf_inputs(images[:1])
    with torch.no_grad():
        ours = module(batch)
        theirs = hf(input_ids=batch.input_ids, pixel_values=patches[0][None]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    assert (args["image_prefix"], args["image_suffix"]) == ([], ["<s>"])  # Fuyu-8B's image text
    # a tokenizer with Mantis's image tokens: a Mantis-Fuyu checkpoint, imported with its text
    mantis_tok = AutoTokenizer.from_pretrained(fuyu_tokenizer)
    mantis_tok.add_special_tokens(
        {"extra_special_tokens": ["|IMAGE|", "|ENDOFIMAGE|"]}, replace_extra_special_tokens=False
    )
    mantis_tok.save_pretrained(tmp_path / "mantis_tok")
    recipe = import_checkpoint(
        tmp_path / "hf", tmp_path / "mantis", tokenizer=tmp_path / "mantis_tok"
    )
    args = yaml.safe_load(recipe.read_text())["model"]["init_args"]["model"]["init_args"]
    assert (args["image_prefix"], args["image_suffix"]) == (["|IMAGE|"], ["|ENDOFIMAGE|", "<s>"])

    with pytest.raises(ValueError, match="model_type is 'llama', not 'fuyu'"):
        import_checkpoint(tiny_assets["llm"], tmp_path / "bad")
    other_dir = tmp_path / "other_tok"  # a tokenizer without Fuyu's tokens
    AutoTokenizer.from_pretrained(tiny_assets["tokenizer"]).save_pretrained(other_dir)
    with pytest.raises(ValueError, match=r"tokenizer has no '\|SPEAKER\|'"):
        import_checkpoint(tmp_path / "hf", tmp_path / "bad", tokenizer=other_dir)


def test_export_fuyu_roundtrip(fuyu, images, tmp_path):
    """A LMMModule exported to the transformers layout loads in FuyuForCausalLM, same logits."""
    _, _, module = fuyu
    out = export_hf(module, tmp_path / "hf")
    hf = FuyuForCausalLM.from_pretrained(out).eval()
    assert hf.config.image_token_id == module.image_token_id
    assert FuyuImageProcessorPil.from_pretrained(out).size["width"] == CANVAS[1]
    processor = Processor(module.tokenizer, MantisFuyu(), module.media_spec(), 512, IMAGE_TOKEN)
    batch = PadCollator(module.tokenizer.pad_token_id)([processor(s) for s in _samples(images)])
    _, patches = fuyu_hf_inputs(images)
    with torch.no_grad():
        ours = module(batch)
        theirs = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=torch.cat(patches)[None],
        ).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_video_frames_are_patched_frame_by_frame(fuyu, images):
    """A media item with several views (a video's frames) gives each frame's patches in order."""
    from lmm.data.batch import Batch

    _, _, module = fuyu
    spec = module.media_spec()
    frames = [Image.open(p).convert("RGB").resize((50, 30)) for p in images[:2]]
    tokens = spec.marker_tokens((30, 50), "video", frames=2)
    ids = torch.tensor([[module.tokenizer.convert_tokens_to_ids(t or IMAGE_TOKEN) for t in tokens]])
    batch = Batch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(ids.shape[1])[None],
        labels=None,
        pixel_values=torch.cat([spec.views(f, "video") for f in frames]),
        views_per_sample=[2],
        ids=["video"],
        image_sizes=torch.tensor([[30, 50]]),
        media_modes=["video"],
        views_per_media=[2],
    )
    patches, per_row = module.model.patches(batch)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(Path(images[0]).with_name(f"frame{i}.png"))
        frame.save(paths[-1])
    _, expected = fuyu_hf_inputs(paths)
    assert per_row == [80] and torch.equal(patches, torch.cat(expected))
    with torch.no_grad():
        assert module(batch).shape == (1, len(tokens), len(module.tokenizer))


def test_slot_count_mismatch_names_the_sample(fuyu, images):
    _, _, module = fuyu
    processor = Processor(module.tokenizer, MantisFuyu(), module.media_spec(), 512, IMAGE_TOKEN)
    batch = PadCollator(module.tokenizer.pad_token_id)([processor(_samples(images)[0])])
    batch.image_sizes = torch.tensor([[13, 21]])  # another size: 24 patches, not 40
    with pytest.raises(
        ValueError,
        match=r"sample 'one': 40 image tokens in the text but 24 image features \(24 patches",
    ):
        module(batch)


def test_mantis_fuyu_recipe_trains_two_steps(fuyu, tiny_assets, synthetic_data, tmp_path):
    from lmm.cli import LMMCLI

    _, imported, _ = fuyu
    cli = LMMCLI(
        args=[
            "fit",
            f"--config={RECIPES / 'mantis' / 'fuyu.yaml'}",
            *cpu_fit_args(tmp_path),
            f"--model.init_args.tokenizer={tiny_assets['tokenizer']}",  # no Fuyu token in it
            f"--model.init_args.model.init_args.llm.init_args.path={imported / 'llm'}",
            "--model.init_args.model.init_args.llm.init_args.dtype=float32",
            f"--model.init_args.model.init_args.patch_embedding={imported / 'patch_embedding.safetensors'}",
            f"--model.init_args.model.init_args.patch_size={PATCH}",
            "--model.init_args.model.init_args.image_height=16",
            "--model.init_args.model.init_args.image_width=24",
            f"--data.init_args.train={synthetic_data / 'train.json'}",
            "--data.init_args.batch_size=2",
            "--data.init_args.max_length=256",
            "--data.init_args.pack_tokens=256",
            "--data.init_args.num_workers=0",
        ]
    )
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    module = cli.model
    # Fuyu's and Mantis's image tokens were added as single tokens, and the embeddings grew
    for token in (IMAGE_TOKEN, NEWLINE_TOKEN, "|IMAGE|", "|ENDOFIMAGE|"):
        assert len(module.tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert module.model.llm.model.get_input_embeddings().num_embeddings == len(module.tokenizer)
    assert module.model.vision.weight.requires_grad  # Mantis-Fuyu trains every weight
