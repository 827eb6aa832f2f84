"""LLaVA-OneVision in the llava family: anyres tiles, multi-image `pad`, pooled video, vs transformers."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from lmm.cli import LMMCLI
from lmm.components.anyres import Anyres, parse_pinpoints, select_best_resolution
from lmm.components.language import CausalLM
from lmm.components.vision import HFVisionTower
from lmm.convert import load_imported
from lmm.data.batch import Batch
from lmm.data.collate import PadCollator
from lmm.data.processor import Processor
from lmm.data.sample import Media, Sample, Turn, VideoRef
from lmm.data.templates import Qwen25
from lmm.families.llava import LlavaModel
from lmm.families.llava.convert import import_checkpoint
from lmm.tiny import build_llm, build_vision
from lmm.training.module import LMMModule

av = pytest.importorskip("av")

TOL = dict(rtol=1e-5, atol=1e-5)
TILE, PATCH = 32, 8  # a tile is a 4 x 4 grid of 16 tokens
PINPOINTS = "(1x1),...,(3x3)"
MAX_TILES = 2  # anyres_max_2
RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# (height, width) of the test images
WIDE = (40, 90)  # 2 x 3 tiles, 8 x 12 grid, unpadded to 6 x 12, shrunk to 4 x 8: 16 + 4·9 = 52
SMALL = (30, 20)  # 1 x 1 tile, unpadded to 4 x 2, not shrunk: 16 + 4·3 = 28
TALL = (60, 30)  # 2 x 1 tiles, 8 x 4 grid, nothing to unpad, ratio 1.0: 16 + 8·5 = 56
OTHER = (50, 70)


def write_video(path: Path, frames: int = 4, size: tuple[int, int] = (48, 64), fps: int = 4):
    """An H.264 file of random frames (height, width = size)."""
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def ov(tiny_assets, tmp_path_factory) -> dict:
    """A tiny OneVision LMMModule (SigLIP 32 px / patch 8, Qwen2), its media and samples."""
    root = tmp_path_factory.mktemp("onevision")
    vision = build_vision(root / "siglip", "siglip", image_size=TILE, patch_size=PATCH)
    llm = build_llm(root / "qwen2", tiny_assets["tokenizer"], "qwen2")
    module = _module(vision, llm, tiny_assets["tokenizer"]).eval()
    images = {
        name: _image(root / f"{name}.png", size, seed)
        for seed, (name, size) in enumerate(
            {"wide": WIDE, "small": SMALL, "tall": TALL, "other": OTHER}.items()
        )
    }
    video = write_video(root / "clip.mp4")

    def chat(sid: str, parts: list, media: list, answer: str) -> Sample:
        return Sample(sid, [Turn("user", parts), Turn("assistant", [answer])], media)

    samples = {
        "wide": chat("wide", [Media(0), "\nwhat shape?"], [images["wide"]], "a red circle"),
        "small": chat("small", ["which colour? ", Media(0)], [images["small"]], "blue"),
        "tall": chat("tall", [Media(0), "\ncount"], [images["tall"]], "three"),
        "pair": chat(
            "pair",
            [Media(0), " and ", Media(1), "\nsame?"],
            [images["small"], images["other"]],
            "no",
        ),
        "triple": chat(
            "triple",
            ["first ", Media(0), Media(1), Media(2)],
            [images["wide"], images["tall"], images["other"]],
            "the second",
        ),
        "video": chat(
            "video", [Media(0), "\nwhere does it go?"], [VideoRef(video, max_frames=4)], "left"
        ),
        "text": chat("text", ["hello"], [], "hi"),
    }
    processor = Processor(module.tokenizer, Qwen25(), module.media_spec(), max_length=1024)
    return {
        "module": module,
        "processor": processor,
        "samples": samples,
        "hf": _hf_onevision(module),
        "vision": vision,
        "llm": llm,
        "video": video,
        "images": images,
    }


def _module(vision: Path, llm: Path, tokenizer: Path, video_newline="one_token") -> LMMModule:
    torch.manual_seed(0)
    anyres = functools.partial(
        Anyres, grid_pinpoints=PINPOINTS, max_tiles=MAX_TILES, video_newline=video_newline
    )
    model = LlavaModel(
        vision=HFVisionTower(str(vision), feature_layer=-1, select="full"),
        llm=CausalLM(str(llm)),
        anyres=anyres,
    )
    return LMMModule(model=model, tokenizer=str(tokenizer))


def _hf_onevision(module: LMMModule) -> LlavaOnevisionForConditionalGeneration:
    """transformers' LLaVA-OneVision with the weights of our tiny OneVision model."""
    ours = module.model
    config = LlavaOnevisionConfig(
        vision_config=ours.vision.model.config.to_dict(),
        text_config=ours.llm.model.config.to_dict(),
        image_token_index=module.image_token_id,
        video_token_index=len(module.tokenizer) - 1,  # replaced per batch: see _hf_inputs
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[list(p) for p in parse_pinpoints(PINPOINTS, TILE)],
        vision_aspect_ratio=f"anyres_max_{MAX_TILES}",
    )
    hf = LlavaOnevisionForConditionalGeneration(config).eval()
    hf.model.vision_tower.load_state_dict(ours.vision.model.state_dict())
    hf.model.multi_modal_projector.load_state_dict(ours.connector.state_dict())
    hf.model.language_model.load_state_dict(ours.llm.model.model.state_dict())
    hf.lm_head.load_state_dict(ours.llm.model.lm_head.state_dict())
    with torch.no_grad():
        hf.model.image_newline.copy_(ours.anyres.image_newline)
    return hf


def _batch(ov, names: list[str]) -> Batch:
    features = [ov["processor"](ov["samples"][n]) for n in names]
    return PadCollator(ov["module"].tokenizer.pad_token_id)(features)


def _hf_inputs(batch: Batch, image_token_id: int, hf) -> dict:
    """The same batch as transformers' OneVision takes it: images and videos apart.

    Images: `pixel_values [n_images, max views, 3, H, W]` (zero-padded), `image_sizes`, and
    `batch_num_images` per row (a row with several images uses their base view only); videos:
    `pixel_values_videos [n_videos, F, 3, H, W]` at `video_token_id` positions.
    """
    video_id = next(i for i in range(hf.config.text_config.vocab_size) if i not in batch.input_ids)
    hf.config.video_token_index = video_id
    input_ids = batch.input_ids.clone()
    items = batch.pixel_values.split(batch.views_per_media)
    modes, sizes = batch.media_modes, batch.image_sizes
    images = [x for x, m in zip(items, modes, strict=True) if m != "video"]
    videos = [x for x, m in zip(items, modes, strict=True) if m == "video"]
    per_row, start = [], 0
    for row, n in enumerate(batch.views_per_sample):  # items of each row, in order
        k, seen = 0, 0
        while seen < n:
            seen += batch.views_per_media[start + k]
            k += 1
        row_modes = modes[start : start + k]
        if "video" in row_modes:
            assert set(row_modes) == {"video"}, "one kind of media per row in these tests"
            input_ids[row][input_ids[row] == image_token_id] = video_id
        per_row.append(sum(m != "video" for m in row_modes))
        start += k
    inputs = {"input_ids": input_ids, "attention_mask": batch.attention_mask}
    if images:
        most = max(x.shape[0] for x in images)
        inputs["pixel_values"] = torch.stack(
            [torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) for x in images]
        )
        inputs["image_sizes"] = sizes[[m != "video" for m in modes]]
        inputs["batch_num_images"] = torch.tensor(per_row)
    if videos:
        inputs["pixel_values_videos"] = torch.stack(videos)
    return inputs


CASES = {
    "image": ["wide", "small", "tall"],  # anyres: unpadding, shrinking (wide) and not
    "multi": ["pair", "triple"],  # several images: base view + newline each
    "video": ["video"],  # 4 frames pooled 4x4 -> 2x2, one newline at the end
    "mixed": ["wide", "pair", "video", "text"],  # all kinds in one padded batch
}


@pytest.mark.parametrize("case", list(CASES))
def test_llava_onevision_against_hf(ov, case):
    module, hf = ov["module"], ov["hf"]
    batch = _batch(ov, CASES[case])
    with torch.no_grad():
        ours = module(batch)
        theirs = hf(**_hf_inputs(batch, module.image_token_id, hf)).logits
    real = batch.attention_mask.bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
    # the pixels matter: blank views change the logits after the media
    batch.pixel_values = torch.zeros_like(batch.pixel_values)
    with torch.no_grad():
        blank = module(batch)
    assert not torch.allclose(blank[real], ours[real], atol=1e-4)


def test_anyres_counts_by_hand(ov):
    anyres = ov["module"].model.anyres
    assert anyres.layout.tiles(WIDE) == (2, 3) and anyres.num_views(WIDE, "image") == 7
    assert anyres.num_tokens(WIDE, "image") == 16 + 4 * 9  # shrunk: 6 x 12 would give 16 + 78
    assert anyres.layout.tiles(SMALL) == (1, 1) and anyres.num_tokens(SMALL, "image") == 16 + 4 * 3
    assert anyres.layout.tiles(TALL) == (2, 1) and anyres.num_tokens(TALL, "image") == 16 + 8 * 5
    assert anyres.num_tokens(WIDE, "multi") == 16 + 1
    assert anyres.num_tokens(WIDE, "video", frames=4) == 4 * 2 * 2 + 1


def test_token_counts_and_pixels_match_transformers_processor(ov):
    """Our counts equal LlavaOnevisionProcessor's, our views its PIL image processor's pixels."""
    anyres, spec = ov["module"].model.anyres, ov["module"].media_spec()
    # transformers' counting methods, without a video processor (torchvision is not installed)
    counter = object.__new__(LlavaOnevisionProcessor)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[list(p) for p in anyres.pinpoints],
        image_mean=list(spec.transform.mean),
        image_std=list(spec.transform.std),
    )
    counter.image_processor = image_processor
    counter.num_image_tokens = 16
    counter.vision_aspect_ratio = f"anyres_max_{MAX_TILES}"
    counter.vision_feature_select_strategy = "full"
    for h, w in itertools.product(range(5, 200, 7), range(3, 200, 11)):
        expected = counter._get_number_of_features(h, w, TILE, TILE)
        assert anyres.num_tokens((h, w), "image") == expected, (h, w)
    assert anyres.num_tokens((h, w), "multi") == counter.num_image_tokens + 1
    for size in (WIDE, SMALL, TALL, OTHER, (100, 37)):
        img = Image.open(_image(Path(ov["video"]).parent / "probe.png", size, seed=9))
        single = image_processor(images=[img], return_tensors="pt")
        torch.testing.assert_close(spec.views(img, "image"), single["pixel_values"][0])
        several = image_processor(images=[[img, img]], return_tensors="pt")
        torch.testing.assert_close(spec.views(img, "multi"), several["pixel_values"][0, :1])


def test_processor_counts_equal_model_features(ov, monkeypatch):
    module, processor = ov["module"], ov["processor"]
    spec = module.media_spec()
    for name, sample in ov["samples"].items():
        features = processor(sample)
        batch = PadCollator(module.tokenizer.pad_token_id)([features])
        with torch.no_grad():
            items = module.model.media_features(batch) if features.views_per_media else []
        n_slots = int((features.input_ids == module.image_token_id).sum())
        assert n_slots == sum(x.shape[0] for x in items), name
        for item, size, mode, views in zip(
            items, features.image_sizes, features.media_modes, features.views_per_media, strict=True
        ):
            frames = views if mode == "video" else 1
            assert item.shape[0] == len(spec.marker_tokens(size, mode, frames)), (name, mode)
        # the length without decoding a single image or video
        with monkeypatch.context() as patch:
            patch.setattr("lmm.data.processor.load_image", _no_decoding)
            patch.setattr("lmm.data.processor.load_video", _no_decoding)
            assert processor.length(sample) == len(features.input_ids), name
    assert features.media_modes == []  # the last sample is text-only
    assert [processor(ov["samples"][n]).media_modes for n in ("pair", "video")] == [
        ["multi", "multi"],
        ["video"],
    ]


def _no_decoding(*args, **kwargs):
    raise AssertionError("Processor.length decoded media")


@pytest.mark.parametrize(
    ("placement", "per_frame", "newline_at"),
    [
        ("one_token", 4, [16]),  # after the video
        ("grid", 6, [2, 5, 8, 11, 14, 17, 20, 23]),  # after each row of each frame
        ("frame", 5, [4, 9, 14, 19]),  # after each frame
        ("no_token", 4, []),
    ],
)
def test_video_newline_placement(placement, per_frame, newline_at):
    anyres = Anyres(8, TILE, 4, grid_pinpoints=PINPOINTS, video_newline=placement)
    with torch.no_grad():
        anyres.image_newline.fill_(-1.0)
    frames = torch.rand(4, 16, 8)  # features are >= 0, the newline -1
    out = anyres(frames, (48, 64), "video")
    assert out.shape[0] == anyres.num_tokens((48, 64), "video", frames=4)
    assert out.shape[0] == 4 * per_frame + (placement == "one_token")
    assert (out[:, 0] == -1).nonzero().flatten().tolist() == newline_at
    pooled = torch.nn.functional.interpolate(
        frames.view(4, 4, 4, 8).permute(0, 3, 1, 2), size=[2, 2], mode="bilinear"
    )  # [F, D, 2, 2]
    first = out[out[:, 0] != -1][:4]  # frame 0's 2 x 2 pooled tokens, row by row
    torch.testing.assert_close(first, pooled[0].permute(1, 2, 0).reshape(4, 8))


def test_pinpoints_and_best_resolution():
    assert parse_pinpoints("(1x1),...,(2x3)", 10) == [
        (10, 10),
        (10, 20),
        (10, 30),
        (20, 10),
        (20, 20),
        (20, 30),
    ]
    assert parse_pinpoints("(1x1),(2x1)", 10) == [(10, 10), (20, 10)]
    assert parse_pinpoints([[384, 768]], 384) == [(384, 768)]
    with pytest.raises(ValueError, match="multiple of the tile size 384"):
        parse_pinpoints([[384, 700]], 384)
    with pytest.raises(ValueError, match="expected tile grids"):
        parse_pinpoints("1x1,2x2", 384)
    grids = parse_pinpoints("(1x1),...,(6x6)", 384)
    assert select_best_resolution((500, 1000), grids) == (768, 1152)
    assert select_best_resolution((300, 200), grids) == (384, 384)


def test_generation_with_onevision_media(ov):
    """Left-padded prompts with anyres, multi-image and video media generate, cache or not."""
    module, processor = ov["module"], ov["processor"]
    prompts = [processor.prompt(ov["samples"][n]) for n in ("wide", "pair", "video")]
    batch = PadCollator(module.tokenizer.pad_token_id, padding_side="left")(prompts)
    with torch.no_grad():
        step = next(iter(module.generation_stream(batch, max_new_tokens=1)))
        logits = module(batch)[:, -1]  # teacher-forced next-token logits
    assert step.rows == [0, 1, 2]
    torch.testing.assert_close(step.logits, logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        cached = module.generate(batch, max_new_tokens=4)
        uncached = module.generate(batch, max_new_tokens=4, use_cache=False)
    assert cached == uncached


def test_mismatch_names_the_sample(ov):
    module = ov["module"]
    batch = _batch(ov, ["small", "wide"])
    row = 1
    pos = (batch.input_ids[row] == module.image_token_id).nonzero()[0]
    batch.input_ids[row, pos] = module.tokenizer.pad_token_id
    with pytest.raises(ValueError, match=r"sample 'wide': 51 image tokens .* 52 image features"):
        module(batch)


def test_parts_and_classic_default(ov, tiny_assets):
    module = ov["module"]
    assert set(module.parts()) == {"vision", "connector", "llm", "newline"}
    assert [n for n, _ in module.parts()["newline"].named_parameters()] == ["image_newline"]
    classic = LlavaModel(
        vision=HFVisionTower(str(tiny_assets["vision"])), llm=CausalLM(str(tiny_assets["llm"]))
    )
    assert classic.anyres is None
    assert not classic.media_spec().size_dependent
    with pytest.raises(ValueError, match="square grids of tokens"):  # CLIP's CLS kept: 17
        LlavaModel(
            vision=HFVisionTower(str(tiny_assets["vision"]), select="full"),
            llm=CausalLM(str(tiny_assets["llm"])),
            anyres=Anyres,
        )


def test_import_llava_qwen_onevision(ov, tiny_assets, tmp_path):
    """A LLaVA-NeXT `llava_qwen` anyres checkpoint imports as OneVision with transformers' logits."""
    module, hf = ov["module"], ov["hf"]
    ours = module.model
    llm = AutoModelForCausalLM.from_pretrained(ov["llm"])
    state = {  # LLaVA-NeXT's tower already lacks its last layer: every layer here is kept
        f"model.vision_tower.vision_tower.vision_model.{k}": v
        for k, v in ours.vision.model.state_dict().items()
        if not k.startswith("head.")
    }
    projector = {"linear_1": "0", "linear_2": "2"}
    for key, value in ours.connector.state_dict().items():
        layer, rest = key.split(".", 1)
        state[f"model.mm_projector.{projector[layer]}.{rest}"] = value
    state["model.image_newline"] = ours.anyres.image_newline.detach()
    state |= {f"model.{k}": v for k, v in llm.model.state_dict().items()}
    state["lm_head.weight"] = llm.lm_head.weight
    config = {
        **llm.config.to_dict(),
        "model_type": "llava_qwen",
        "mm_vision_tower": "nobody/tiny-siglip",
        "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": f"anyres_max_{MAX_TILES}",
        "image_grid_pinpoints": [list(p) for p in parse_pinpoints(PINPOINTS, TILE)],
        "mm_newline_position": "one_token",
    }
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(tiny_assets["tokenizer"]).save_pretrained(src)

    import_checkpoint(src, tmp_path / "out", "llava_qwen", vision_config=ov["vision"])
    imported = load_imported(tmp_path / "out").eval()
    assert imported.model.anyres.max_tiles == MAX_TILES
    assert imported.model.anyres.video_newline == "one_token"
    torch.testing.assert_close(imported.model.anyres.image_newline, ours.anyres.image_newline)
    batch = _batch(ov, CASES["mixed"])
    with torch.no_grad():
        logits = imported(batch)
        theirs = hf(**_hf_inputs(batch, module.image_token_id, hf)).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits[real], theirs[real], **TOL)


def test_onevision_recipe_trains_two_steps(ov, tiny_assets, tmp_path):
    """recipes/mammoth_vl/stage3_ov.yaml with tiny models: an image and a video sample train."""
    data = tmp_path / "data"
    data.mkdir()
    _image(data / "photo.png", (40, 90), seed=3)
    write_video(data / "clip.mp4", frames=6, fps=2)  # 3 s at 1 fps: 3 frames
    records = [
        {
            "id": "img-1",
            "image": "photo.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "a red circle"},
            ],
        },
        {
            "id": "vid-1",
            "video": "clip.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\nWhere does it move?"},
                {"from": "gpt", "value": "left"},
            ],
        },
    ]
    (data / "train.json").write_text(json.dumps(records))
    seen = _Modes()
    cli = LMMCLI(
        args=[
            f"--config={RECIPES / 'mammoth_vl/stage3_ov.yaml'}",
            "--trainer.strategy=auto",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.max_steps=2",
            "--trainer.max_epochs=2",  # one batch (both samples) per epoch
            "--trainer.accumulate_grad_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.tokenizer={tiny_assets['tokenizer']}",
            f"--model.init_args.model.init_args.vision.init_args.path={ov['vision']}",
            "--model.init_args.model.init_args.vision.init_args.dtype=float32",
            f"--model.init_args.model.init_args.llm.init_args.path={ov['llm']}",
            "--model.init_args.model.init_args.llm.init_args.dtype=float32",
            "--model.init_args.init_from=null",
            f"--data.init_args.train={data / 'train.json'}",
            "--data.init_args.batch_size=2",
            "--data.init_args.max_length=1024",
            "--data.init_args.pack_tokens=1024",
            "--data.init_args.num_workers=0",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(seen)
    anyres = cli.model.model.anyres
    assert anyres.video_newline == "grid" and anyres.max_tiles == 4
    start = anyres.image_newline.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert {"image", "video"} <= seen.modes
    assert not torch.equal(anyres.image_newline.detach(), start)  # part `newline` trains


class _Modes(L.Callback):
    def __init__(self):
        self.modes: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes |= set(batch.media_modes)
