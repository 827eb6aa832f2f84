"""The Idefics2 family: views, tokens and logits equal transformers' Idefics2; import; template; training."""

from __future__ import annotations

import copy
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    Idefics2ForConditionalGeneration,
    Idefics2Processor,
    MistralForCausalLM,
)
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from lmm.cli import LMMCLI
from lmm.components.language import CausalLM
from lmm.convert import load_imported
from lmm.data.collate import PadCollator
from lmm.data.media import ImageTransform
from lmm.data.processor import Processor
from lmm.data.sample import Media, Sample, Turn
from lmm.data.templates import Idefics2, render_text, trainable_text
from lmm.data.tokenization import SegmentTokenizer
from lmm.families.idefics2 import (
    Idefics2MediaSpec,
    Idefics2Model,
    Idefics2Vision,
    PerceiverConnector,
)
from lmm.families.idefics2.convert import import_checkpoint
from lmm.families.idefics2.model import view_sizes
from lmm.training.lora import trainable_counts
from lmm.training.module import LMMModule
from tests.builders import IDEFICS2_CHAT_TEMPLATE, build_tiny_idefics2
from tests.data.real_tokenizers import add_special_tokens, build_mistral_tokenizer
from tests.helpers import cpu_fit_args

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHORTEST, LONGEST, LATENTS = 16, 32, 4  # the tiny checkpoint's image sizes and perceiver
SIZES = {"square": (32, 32), "wide": (24, 40), "tall": (40, 20), "small": (9, 17), "odd": (50, 33)}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_ckpt(tiny_assets, tmp_path_factory) -> Path:
    """A tiny random transformers Idefics2, saved with save_pretrained (with its tokenizer)."""
    out = tmp_path_factory.mktemp("idefics2_hf")
    return build_tiny_idefics2(out, tiny_assets["tokenizer"], latents=LATENTS)


@pytest.fixture(scope="module")
def hf_llm(hf_ckpt, tmp_path_factory) -> Path:
    """The checkpoint's text model and lm_head as a MistralForCausalLM folder, written by hand."""
    hf = Idefics2ForConditionalGeneration.from_pretrained(hf_ckpt)
    llm = MistralForCausalLM(hf.config.text_config)
    llm.model.load_state_dict(hf.model.text_model.state_dict())
    llm.lm_head.load_state_dict(hf.lm_head.state_dict())
    out = tmp_path_factory.mktemp("idefics2_llm")
    llm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Noise images of several (height, width), as PNG files."""
    out = tmp_path_factory.mktemp("idefics2_images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in SIZES.items():
        paths[name] = out / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths


def _module(hf_ckpt: Path, llm: Path, split: bool) -> LMMModule:
    """The lmm family on the checkpoint's weights: tower and connector read from it directly."""
    model = Idefics2Model(
        vision=Idefics2Vision(str(hf_ckpt)),
        connector=PerceiverConnector(str(hf_ckpt)),
        llm=CausalLM(str(llm)),
        do_image_splitting=split,
        shortest_edge=SHORTEST,
        longest_edge=LONGEST,
    )
    return LMMModule(model=model, tokenizer=str(hf_ckpt))


def _samples(images: dict[str, Path]) -> list[Sample]:
    return [
        Sample(
            "one-image",
            [Turn("user", [Media(0), "What colour is it?"]), Turn("assistant", ["red"])],
            [images["wide"]],
        ),
        Sample(
            "two-images",
            [
                Turn("user", ["Compare ", Media(0), " with", Media(1), "."]),
                Turn("assistant", ["the same"]),
                Turn("user", ["And", Media(2), "?"]),
                Turn("assistant", ["no"]),
            ],
            [images["tall"], images["square"], images["odd"]],
        ),
        Sample("text-only", [Turn("user", ["hello"]), Turn("assistant", ["hi"])]),
    ]


def _processor(module: LMMModule) -> Processor:
    return Processor(module.tokenizer, Idefics2(), module.media_spec(), max_length=1024)


def _batch(module: LMMModule, samples: list[Sample]):
    features = [_processor(module)(s) for s in samples]
    return PadCollator(module.tokenizer.pad_token_id)(features)


def _same_pixels(module: LMMModule, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's views as transformers takes them: `[B, N, 3, H, W]` + the pixel mask."""
    sizes = module.model.view_sizes(batch)
    rows, most = len(batch), max(batch.views_per_sample)
    pixels = torch.zeros(rows, most, *batch.pixel_values.shape[1:])
    mask = torch.zeros(rows, most, *batch.pixel_values.shape[2:], dtype=torch.long)
    k = 0
    for row, n in enumerate(batch.views_per_sample):
        for j in range(n):
            pixels[row, j] = batch.pixel_values[k]
            h, w = sizes[k].tolist()
            mask[row, j, :h, :w] = 1
            k += 1
    return pixels, mask


def _hf_pixels(samples: list[Sample], split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's images through transformers' own Idefics2 image processor, padded together."""
    proc = Idefics2ImageProcessorPil(
        do_image_splitting=split, size={"shortest_edge": SHORTEST, "longest_edge": LONGEST}
    )
    rows = [
        proc([[Image.open(p).convert("RGB") for p in s.images]], return_tensors="pt")
        if s.images
        else None
        for s in samples
    ]
    most = max(r["pixel_values"].shape[1] for r in rows if r is not None)
    pixels = torch.zeros(len(rows), most, 3, LONGEST, LONGEST)
    mask = torch.zeros(len(rows), most, LONGEST, LONGEST, dtype=torch.long)
    for b, r in enumerate(rows):
        if r is not None:
            n, _, h, w = r["pixel_values"][0].shape
            pixels[b, :n, :, :h, :w] = r["pixel_values"][0]
            mask[b, :n, :h, :w] = r["pixel_attention_mask"][0]
    return pixels, mask


def _hf_logits(hf, batch, pixels, mask) -> torch.Tensor:
    with torch.no_grad():
        return hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=pixels,
            pixel_attention_mask=mask,
        ).logits


# --- equivalence with transformers ---------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_idefics2_against_hf(hf_ckpt, hf_llm, images, split):
    module = _module(hf_ckpt, hf_llm, split).eval()
    samples = _samples(images)
    batch = _batch(module, samples)
    views = 5 if split else 1
    assert batch.views_per_sample == [views, 3 * views, 0]
    assert batch.pixel_values.shape == (4 * views, 3, LONGEST, LONGEST)
    hf = Idefics2ForConditionalGeneration.from_pretrained(hf_ckpt).eval()
    real = batch.attention_mask.bool()
    with torch.no_grad():
        ours = module(batch)
    # the same input_ids / pixel_values / pixel_attention_mask
    theirs = _hf_logits(hf, batch, *_same_pixels(module, batch))
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    # pixels and masks from transformers' own image processor (padded to the largest view)
    theirs = _hf_logits(hf, batch, *_hf_pixels(samples, split))
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    # the images matter: blank views change the logits after them
    batch.pixel_values = torch.zeros_like(batch.pixel_values)
    with torch.no_grad():
        blank = module(batch)
    assert not torch.allclose(blank[real], ours[real], atol=1e-4)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_views_equal_idefics2_image_processor(hf_ckpt, hf_llm, images, split):
    """Views (crops, resize, normalisation) and their valid regions equal transformers'."""
    module = _module(hf_ckpt, hf_llm, split)
    spec = module.media_spec()
    proc = Idefics2ImageProcessorPil(
        do_image_splitting=split, size={"shortest_edge": SHORTEST, "longest_edge": LONGEST}
    )
    for name, (h, w) in SIZES.items():
        image = Image.open(images[name]).convert("RGB")
        ours = spec.views(image, "image")  # [V, 3, L, L]
        theirs = proc([[image]], return_tensors="pt")
        pixels, mask = theirs["pixel_values"][0], theirs["pixel_attention_mask"][0]
        assert ours.shape == (5 if split else 1, 3, LONGEST, LONGEST), name
        sizes = view_sizes(h, w, split, SHORTEST, LONGEST)
        for k, (vh, vw) in enumerate(sizes):
            assert mask[k].sum().item() == vh * vw and mask[k, vh - 1, vw - 1] == 1, (name, k)
            torch.testing.assert_close(
                ours[k, :, :vh, :vw], pixels[k, :, :vh, :vw], rtol=0, atol=1e-6
            )
            assert ours[k, :, vh:].abs().sum() == 0 and ours[k, :, :, vw:].abs().sum() == 0
        # patches wholly inside the view: transformers' unfold rule on its pixel mask
        p = module.model.vision.patch_size
        grid = mask.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) == p * p
        ours_grid = module.model.patch_mask(torch.tensor(sizes), *mask.shape[-2:])
        assert torch.equal(ours_grid, grid), name
    assert view_sizes(24, 40, False, SHORTEST, LONGEST) == [(19, 32)]  # int(32 / (40 / 24))


# --- tokens: template + processor against transformers' chat template + Idefics2Processor -----


def _messages(turns: list[Turn]) -> list[dict]:
    return [
        {
            "role": t.role,
            "content": [
                {"type": "image"} if isinstance(p, Media) else {"type": "text", "text": p}
                for p in t.parts
            ],
        }
        for t in turns
    ]


def _hf_ids(hf_processor, turns: list[Turn], sample: Sample, prompt: bool) -> list[int]:
    text = "<s>" + jinja2.Template(IDEFICS2_CHAT_TEMPLATE).render(
        messages=_messages(turns), add_generation_prompt=prompt
    )
    imgs = [Image.open(p).convert("RGB") for p in sample.images]
    out = hf_processor(text=[text], images=[imgs] if imgs else None, add_special_tokens=False)
    return list(out["input_ids"][0])


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """The Mistral-7B v1 tokenizer with Idefics2's added tokens (as idefics2-8b's tokenizer)."""
    tok = build_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    add_special_tokens(tok, ["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    return tok


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("which", ["tiny_bpe", "mistral"])
def test_tokens_equal_idefics2_processor(hf_ckpt, hf_llm, images, mistral, split, which):
    tokenizer = mistral if which == "mistral" else _module(hf_ckpt, hf_llm, split).tokenizer
    spec = Idefics2MediaSpec(
        transform=ImageTransform(LONGEST, (0.5,) * 3, (0.5,) * 3, "resize"),
        image_seq_len=LATENTS,
        do_image_splitting=split,
        shortest_edge=SHORTEST,
        longest_edge=LONGEST,
        fake_token="<fake_token_around_image>",
    )
    ours = Processor(tokenizer, Idefics2(), spec, max_length=1024)
    hf_processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(
            do_image_splitting=split, size={"shortest_edge": SHORTEST, "longest_edge": LONGEST}
        ),
        tokenizer=copy.deepcopy(tokenizer),
        image_seq_len=LATENTS,
    )
    for sample in _samples(images):
        features = ours(sample)
        assert features.input_ids.tolist() == _hf_ids(hf_processor, sample.turns, sample, False)
        assert ours.length(sample) == len(features.input_ids)  # counted without decoding
        prompt = ours.prompt(sample)
        turns = sample.turns[:-1]
        assert prompt.input_ids.tolist() == _hf_ids(hf_processor, turns, sample, True)
        fake = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
        views = 5 if split else 1  # one <fake> before an image and one after each of its views
        assert (features.input_ids == fake).sum() == len(sample.images) * (1 + views)
    labels = ours(_samples(images)[0]).labels
    trained = tokenizer.decode(labels[labels != -100])
    assert trained.strip() == "red<end_of_utterance>"


def test_adjacent_images_share_a_boundary_token(hf_ckpt, hf_llm, images):
    module = _module(hf_ckpt, hf_llm, False)
    sample = Sample(
        "adjacent",
        [Turn("user", [Media(0), Media(1), "Same?"]), Turn("assistant", ["yes"])],
        [images["square"], images["wide"]],
    )
    hf_processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(
            size={"shortest_edge": SHORTEST, "longest_edge": LONGEST}
        ),
        tokenizer=copy.deepcopy(module.tokenizer),
        image_seq_len=LATENTS,
    )
    ours = _processor(module)(sample).input_ids.tolist()
    assert ours == _hf_ids(hf_processor, sample.turns, sample, False)


def test_idefics2_template_renders_the_transformers_format():
    turns = [
        Turn("system", ["Be brief."]),
        Turn("user", [Media(0), "What colour?"]),
        Turn("assistant", ["red"]),
        Turn("user", ["And", Media(1), "\nthe shape?"]),
        Turn("assistant", ["a square"]),
    ]
    segments = Idefics2().render(turns)
    assert render_text(segments) == (
        "<s>System: Be brief.<end_of_utterance>\n"
        "User:<image> What colour?<end_of_utterance>\nAssistant: red<end_of_utterance>\n"
        "User: And<image>\nthe shape?<end_of_utterance>\nAssistant: a square<end_of_utterance>\n"
    )
    assert trainable_text(segments) == " red<end_of_utterance> a square<end_of_utterance>"
    prompt = Idefics2().render(turns[:2], add_generation_prompt=True)
    assert render_text(prompt).endswith("<end_of_utterance>\nAssistant:")
    assert Idefics2.stop_strings == ("<end_of_utterance>",)


def test_idefics2_segments_tokenize_like_the_whole_text(mistral):
    """Cut points (after `:`, before the answer's space, around images) keep Mistral's tokens."""
    turns = [
        Turn("user", [Media(0), "What colour?"]),
        Turn("assistant", ["red"]),
        Turn("user", ["And the shape?"]),
        Turn("assistant", ["a square"]),
    ]
    segments = Idefics2().render(turns)
    ids, _ = SegmentTokenizer(mistral).encode(segments)
    assert ids == mistral(render_text(segments), add_special_tokens=False).input_ids


# --- the media spec and the model's checks ---------------------------------------------------


def test_marker_tokens_layout(hf_ckpt, hf_llm):
    module = _module(hf_ckpt, hf_llm, True)
    spec = module.media_spec()
    fake = "<fake_token_around_image>"
    one_view = [None] * LATENTS + [fake]
    assert spec.marker_tokens((32, 32), "image") == [fake] + one_view * 5
    assert spec.marker_tokens((32, 32), "video", frames=3) == [fake] + one_view * 15
    assert spec.num_image_tokens((7, 900)) == LATENTS and not spec.size_dependent
    module.model.do_image_splitting = False
    assert module.media_spec().marker_tokens((5, 5), "multi") == [fake] + one_view


def test_views_of_another_setting_are_refused(hf_ckpt, hf_llm, images):
    module = _module(hf_ckpt, hf_llm, True)
    batch = _batch(module, _samples(images)[:1])
    module.model.do_image_splitting = False  # 5 views per image no longer expected
    with pytest.raises(
        ValueError, match=r"media item 0 \(image\) has 5 views, but an image gives 1"
    ):
        module.model.view_sizes(batch)
    module.model.do_image_splitting = True
    batch.image_sizes = None
    with pytest.raises(ValueError, match="image_sizes"):
        module(batch)


def test_generation_equals_hf_greedy(hf_ckpt, hf_llm, images):
    """Greedy decoding through `llm` with `inputs_embeds` gives transformers' greedy tokens."""
    module = _module(hf_ckpt, hf_llm, False).eval()
    hf = Idefics2ForConditionalGeneration.from_pretrained(hf_ckpt).eval()
    for sample in _samples(images)[:2]:
        batch = PadCollator(module.tokenizer.pad_token_id, "left")(
            [_processor(module).prompt(sample)]
        )
        with torch.no_grad():
            steps = list(module.generation_stream(batch, 4, use_cache=True))
            ours = [s.tokens[0] for s in steps if s.tokens[0] is not None]
            pixels, mask = _same_pixels(module, batch)
            theirs = hf.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=pixels,
                pixel_attention_mask=mask,
                max_new_tokens=4,
                do_sample=False,
                eos_token_id=None,
            )[0, batch.input_ids.shape[1] :].tolist()
        assert ours and ours == theirs[: len(ours)], sample.id


# --- import --------------------------------------------------------------------------------


def test_import_idefics2(hf_ckpt, images, tmp_path):
    recipe = import_checkpoint(hf_ckpt, tmp_path / "imported")
    assert recipe == tmp_path / "imported" / "lmm.yaml"
    with safe_open(tmp_path / "imported" / "vision" / "model.safetensors", "pt") as f:
        prefixes = {k.split(".")[1] for k in f.keys()}
    assert prefixes == {"vision_model", "connector"}  # the text model went to llm/
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "imported" / "llm")
    assert type(llm) is MistralForCausalLM
    module = load_imported(tmp_path / "imported").eval()
    assert module.model.do_image_splitting is False and module.model.longest_edge == LONGEST
    samples = _samples(images)
    batch = _batch(module, samples)
    hf = Idefics2ForConditionalGeneration.from_pretrained(hf_ckpt).eval()
    with torch.no_grad():
        ours = module(batch)
    theirs = _hf_logits(hf, batch, *_hf_pixels(samples, False))
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_import_refuses_other_checkpoints(tiny_assets, tmp_path):
    with pytest.raises(ValueError, match="expected a transformers Idefics2"):
        import_checkpoint(tiny_assets["llm"], tmp_path / "out")


# --- training through the CLI --------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(hf_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idefics2_imported")
    import_checkpoint(hf_ckpt, out)
    return out


def _paths(imported: Path) -> list[str]:
    model = "--model.init_args.model.init_args"
    return [
        f"--model.init_args.tokenizer={imported / 'tokenizer'}",
        f"{model}.vision.init_args.path={imported / 'vision'}",
        f"{model}.connector.init_args.path={imported / 'vision'}",
        f"{model}.llm.init_args.path={imported / 'llm'}",
    ]


def test_tiny_recipe_trains_two_steps(imported, synthetic_data, tmp_path):
    cli = LMMCLI(
        args=[
            f"--config={RECIPES / 'tiny' / 'idefics2_synthetic.yaml'}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false",
            f"--data.init_args.train={synthetic_data / 'train.json'}",
            f"--data.init_args.val={synthetic_data / 'val.json'}",
            f"--data.init_args.test={synthetic_data / 'test.json'}",
            "--data.init_args.batch_size=4",
            *_paths(imported),
        ],
        run=False,
    )
    module = cli.model
    assert isinstance(module, LMMModule) and module.model.do_image_splitting
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    changed = {
        n.split(".")[1] for n, p in module.named_parameters() if not torch.equal(p, before[n])
    }
    assert changed == {"vision", "connector", "llm"}


def test_mantis_idefics2_qlora_recipe_trains_two_steps(imported, synthetic_data, tmp_path):
    """The Mantis recipe with tiny sizes: 4-bit nf4 LLM, LoRA on the LLM and the connector."""
    import bitsandbytes as bnb

    model = "--model.init_args.model.init_args"
    cli = LMMCLI(
        args=[
            f"--config={RECIPES / 'mantis' / 'idefics2_qlora.yaml'}",
            *cpu_fit_args(tmp_path),
            *_paths(imported),
            *(f"{model}.{part}.init_args.dtype=float32" for part in ("vision", "connector", "llm")),
            f"{model}.shortest_edge={SHORTEST}",
            f"{model}.longest_edge={LONGEST}",
            f"--data.init_args.train={synthetic_data / 'train.json'}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
        ],
        run=False,
    )
    module = cli.model
    q = module.model.llm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    names = {n for n, m in module.named_modules() if hasattr(m, "lora_A")}
    connector = {n.split("connector.model.")[1] for n in names if "connector" in n}
    assert "modality_projection.gate_proj" in connector
    assert "perceiver_resampler.layers.1.self_attn.k_proj" in connector
    assert not any(".vision." in n or "lm_head" in n for n in names)
    assert set(trainable_counts(module)) == {"lora"}  # train_parts: [] as Mantis
    lora_b = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    assert all(p.abs().sum() == 0 for p in lora_b.values())
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    moved = [n for n, p in module.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert len(moved) == len(lora_b)
