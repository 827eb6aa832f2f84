"""Qwen2.5-VL: logits, packing, token counts, import / export and generation vs transformers."""

from __future__ import annotations

import itertools
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lmm.convert import load_imported
from lmm.data.batch import Batch
from lmm.data.collate import PadCollator
from lmm.data.media import load_image
from lmm.data.packing import PackCollator
from lmm.data.processor import Processor
from lmm.data.sample import Media, Sample, Turn, VideoRef
from lmm.data.templates import ChatML
from lmm.data.video import load_video
from lmm.families.qwen2_5_vl import Qwen25VLModel
from lmm.families.qwen2_5_vl.convert import (
    VIDEO_PAD,
    export_hf,
    import_checkpoint,
)
from lmm.families.qwen2_5_vl.media import temporal_rows
from lmm.families.qwen2_5_vl.positions import item_positions, sample_positions
from lmm.training.module import LMMModule
from lmm.training.strategies import FSDP2Config
from tests.builders import build_tiny_qwen2_5_vl
from tests.families.test_onevision import write_video as onevision_write_video

av = pytest.importorskip("av")

TOL = dict(rtol=1e-5, atol=1e-5)
FPS = 2.0  # the model's video_fps: a frame pair spans 1 s, 2 temporal positions
# (height, width) of the test images: 56 x 84 px resized (2 x 3 merged, windows padded),
# 56 x 56 (2 x 2) and 112 x 112 (4 x 4: two windows a side); video frames 84 x 84 (3 x 3)
WIDE, SMALL, BIG, FRAME = (50, 90), (60, 70), (100, 120), (80, 90)


write_video = partial(onevision_write_video, size=FRAME)  # H.264 of random frames


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _chat(sid: str, parts: list, media: list, answer: str) -> Sample:
    return Sample(sid, [Turn("user", parts), Turn("assistant", [answer])], media)


@pytest.fixture(scope="module")
def qwen(tiny_assets, tmp_path_factory) -> dict:
    """A tiny Qwen2.5-VL checkpoint, our module of it, transformers' model, media and samples."""
    root = tmp_path_factory.mktemp("qwen2_5_vl")
    hf_dir = build_tiny_qwen2_5_vl(root / "hf", tiny_assets["tokenizer"], video_max_pixels=84 * 84)
    model = Qwen25VLModel(str(hf_dir), video_fps=FPS)
    module = LMMModule(model=model, tokenizer=str(hf_dir)).eval()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    images = {
        name: _image(root / f"{name}.png", size, seed)
        for seed, (name, size) in enumerate({"wide": WIDE, "small": SMALL, "big": BIG}.items())
    }
    video = write_video(root / "clip.mp4")
    samples = {
        "wide": _chat("wide", [Media(0), "\nwhat shape?"], [images["wide"]], "a red circle"),
        "pair": _chat(
            "pair",
            [Media(0), " and ", Media(1), "\nsame?"],
            [images["small"], images["big"]],
            "no",
        ),
        "video": _chat(
            "video", [Media(0), "\nwhere does it go?"], [VideoRef(video, max_frames=4)], "left"
        ),
        "text": _chat("text", ["hello"], [], "hi"),
    }
    processor = Processor(
        module.tokenizer, ChatML(), module.media_spec(), image_token="<|image_pad|>"
    )
    return {
        "root": root,
        "hf_dir": hf_dir,
        "module": module,
        "hf": hf,
        "processor": processor,
        "samples": samples,
        "images": images,
        "video": video,
    }


def _features(qwen, names: list[str]):
    return [qwen["processor"](qwen["samples"][n]) for n in names]


def _padded(qwen, names: list[str], side: str = "right") -> Batch:
    pad = qwen["module"].tokenizer.pad_token_id
    return PadCollator(pad, padding_side=side)(_features(qwen, names))


# --- transformers' inputs, built apart from lmm's media spec -----------------------------------


def _reference_pixels(image: Image.Image, min_pixels: int, max_pixels: int) -> np.ndarray:
    """`[3, H, W]` float32: Qwen2VLImageProcessorPil's resize, rescale and normalise."""
    proc = Qwen2VLImageProcessorPil()
    x = proc.process_image(image, do_convert_rgb=True)
    size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    x = proc.resize(x, size=size, resample=PILImageResampling.BICUBIC, factor=28)
    x = proc.rescale(x, 1 / 255)
    return proc.normalize(x, proc.image_mean, proc.image_std)


def _reference_video(frames: list[Image.Image], min_pixels: int, max_pixels: int):
    """transformers' `Qwen2VLVideoProcessor.patchify` (5.x) on frames resized as its images."""
    videos = torch.from_numpy(
        np.stack([_reference_pixels(f, min_pixels, max_pixels) for f in frames])
    )[None]  # [1, F, C, H, W]
    batch_size, num_frames, channel, height, width = videos.shape
    patch, merge, temporal = 14, 2, 2
    if pad := -num_frames % temporal:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // temporal, height // patch, width // patch
    patches = videos.view(
        batch_size,
        grid_t,
        temporal,
        channel,
        grid_h // merge,
        merge,
        patch,
        grid_w // merge,
        merge,
        patch,
    )
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal * patch * patch)
    return flat, [grid_t, grid_h, grid_w]


def _hf_inputs(qwen, batch: Batch, names: list[str]) -> dict:
    """The batch as transformers takes it: `<|video_pad|>` in video rows, its own pixels."""
    hf, spec = qwen["hf"], qwen["module"].media_spec()
    image_id = qwen["module"].image_token_id
    video_id = qwen["module"].tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    input_ids = batch.input_ids.clone()
    images, videos = [], []
    for row, name in enumerate(names):
        sample = qwen["samples"][name]
        for item in sample.images:
            if isinstance(item, VideoRef):
                input_ids[row][input_ids[row] == image_id] = video_id
                frames = load_video(item.path, **item.sampling)
                videos.append(
                    _reference_video(frames, spec.video_min_pixels, spec.video_max_pixels)
                )
            else:
                images.append(load_image(item))
    inputs = {"input_ids": input_ids, "attention_mask": batch.attention_mask}
    if images:
        proc = Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
        out = proc(images=images, return_tensors="pt")
        inputs["pixel_values"] = out["pixel_values"]
        inputs["image_grid_thw"] = out["image_grid_thw"]
    if videos:
        inputs["pixel_values_videos"] = torch.cat([v for v, _ in videos])
        inputs["video_grid_thw"] = torch.tensor([g for _, g in videos])
        inputs["second_per_grid_ts"] = torch.tensor([2 / FPS] * len(videos))
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == image_id] = 1
    types[input_ids == video_id] = 2
    inputs["mm_token_type_ids"] = types
    assert hf.config.image_token_id == image_id and hf.config.video_token_id == video_id
    return inputs


MIXED = ["wide", "pair", "video", "text"]


def test_qwen2_5_vl_against_hf(qwen):
    module, hf = qwen["module"], qwen["hf"]
    batch = _padded(qwen, MIXED)
    assert batch.media_modes == ["image", "multi", "multi", "video"]
    with torch.no_grad():
        ours = module(batch)
        theirs = hf(**_hf_inputs(qwen, batch, MIXED)).logits
    real = batch.attention_mask.bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
    # the M-RoPE positions matter: plain text positions change the logits
    model = module.model
    with torch.no_grad():
        embeds = model.embed(batch, module.image_token_id)
        text = model.llm.run(embeds, batch.attention_mask, batch.position_ids)
    assert not torch.allclose(text[real], ours[real], atol=1e-3)
    # the pixels matter: blank patches change the logits after the media
    batch.pixel_values = torch.zeros_like(batch.pixel_values)
    with torch.no_grad():
        blank = module(batch)
    assert not torch.allclose(blank[real], ours[real], atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa_packed", "sdpa"])
def test_packed_equals_padded(qwen, attention):
    """One packed row of every sample: the same loss and logits as the padded batch
    (`sdpa_packed`: no mask, samples from the text positions; `sdpa`: a block mask)."""
    module = qwen["module"]
    if attention != "sdpa_packed":
        model = Qwen25VLModel(str(qwen["hf_dir"]), attn_implementation=attention, video_fps=FPS)
        module = LMMModule(model=model, tokenizer=str(qwen["hf_dir"])).eval()
    assert module.model.llm.model.config._attn_implementation == attention
    features = _features(qwen, MIXED)
    padded = PadCollator(module.tokenizer.pad_token_id)(features)
    packed = PackCollator(module.tokenizer.pad_token_id, 4096).collate_rows([features])
    assert packed.seq_lens[0] == [len(f.input_ids) for f in features]
    with torch.no_grad():
        loss_padded, n_padded = module.loss(padded)
        loss_packed, n_packed = module.loss(packed)
        row = module(packed)[0]
        rows = module(padded)
    assert int(n_packed) == int(n_padded) > 0
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=0)
    start = 0
    for b, f in enumerate(features):
        n = len(f.input_ids)
        torch.testing.assert_close(row[start : start + n], rows[b, :n], **TOL)
        start += n


def test_token_counts_and_pixels_match_transformers_processor(qwen, tmp_path):
    """Marker counts = transformers' patch counts / 4 = the features the model makes; our
    patch rows are the PIL image processor's pixel_values."""
    module = qwen["module"]
    spec, model = module.media_spec(), module.model
    proc = Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    for h, w in itertools.product(range(10, 400, 23), range(7, 400, 29)):
        expected = proc.get_number_of_image_patches(h, w, {}) // 4
        tokens = spec.marker_tokens((h, w), "image")
        assert tokens == ["<|vision_start|>", *[None] * expected, "<|vision_end|>"], (h, w)
    for seed, size in enumerate([(28, 28), (10, 300), (300, 41), (123, 77), (400, 400)]):
        img = load_image(_image(tmp_path / f"{seed}.png", size, seed))
        rows = temporal_rows(spec.views(img, "image"), 1, spec.temporal_patch_size)
        reference = proc(images=[img], return_tensors="pt")
        torch.testing.assert_close(rows, reference["pixel_values"], rtol=0, atol=0)
        gh, gw = reference["image_grid_thw"][0, 1:].tolist()
        grid = torch.tensor([[1, gh, gw]])
        with torch.no_grad():
            features = model.encode(rows, grid)
        assert features.shape[0] == len(spec.marker_tokens(size, "image")) - 2 == gh * gw // 4


@pytest.mark.parametrize("frames", [3, 4])
def test_video_frames_against_hf(qwen, frames):
    """A video of an odd frame count repeats its last frame, as transformers' processor."""
    sample = _chat(
        "clip", [Media(0), "\nwhat happens?"], [VideoRef(qwen["video"], max_frames=frames)], "x"
    )
    qwen["samples"]["clip"] = sample
    processor = qwen["processor"]
    features = processor(sample)
    spec = qwen["module"].media_spec()
    n = spec.num_tokens(FRAME, "video", frames)
    assert n == 2 * 3 * 3  # two frame pairs of 3 x 3 merged patches
    assert features.views_per_media == [frames * 6 * 6]  # 6 x 6 patches a frame
    assert int((features.input_ids == qwen["module"].image_token_id).sum()) == n
    assert processor.length(sample) == len(features.input_ids)  # from the header alone
    batch = PadCollator(qwen["module"].tokenizer.pad_token_id)([features])
    with torch.no_grad():
        ours = qwen["module"](batch)
        theirs = qwen["hf"](**_hf_inputs(qwen, batch, ["clip"])).logits
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_import_round_trip(qwen, tmp_path, layout):
    """HF folder (either key layout) → import → the recipe's module: HF's logits; export → the
    same weights."""
    src = tmp_path / "src"
    shutil.copytree(qwen["hf_dir"], src)
    state = load_file(src / "model.safetensors")
    if layout == "v5":  # save_pretrained writes the older names; rename to transformers 5's
        renames = (("visual.", "model.visual."), ("model.", "model.language_model."))
        state = {_rename(k, renames): v for k, v in state.items()}
        assert "model.visual.merger.mlp.0.weight" in state
    else:
        assert "visual.merger.mlp.0.weight" in state and "model.embed_tokens.weight" in state
    save_file(state, src / "model.safetensors", {"format": "pt"})
    recipe = import_checkpoint(src, tmp_path / "lmm")
    assert "init_from" in recipe.read_text()
    module = load_imported(tmp_path / "lmm").eval()
    assert module.model.video_fps == 2.0 and module.media_spec() == qwen["module"].media_spec()
    batch = _padded(qwen, ["wide", "pair"])
    with torch.no_grad():
        ours = module(batch)
        theirs = qwen["hf"](**_hf_inputs(qwen, batch, ["wide", "pair"])).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
    out = export_hf(module, tmp_path / "exported")
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).state_dict()
    original = qwen["hf"].state_dict()
    assert back.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(back[k], v), k


def _rename(key: str, renames) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _greedy(module, batch: Batch, steps: int, **kwargs) -> list[list[int]]:
    """The core generator's greedy tokens per row, the stop token that ended a row included."""
    rows: list[list[int]] = [[] for _ in range(len(batch))]
    for step in module.generation_stream(batch, steps, **kwargs):
        for i, r in enumerate(step.rows):
            rows[r].append(int(step.logits[i].argmax()))
    return rows


def test_greedy_generation_equals_hf_generate(qwen):
    """A left-padded batch of two image prompts: the core generator (the family's prefill with
    `[3, B, L]` M-RoPE positions, then `last + 1`) = transformers' `generate`."""
    module, hf = qwen["module"], qwen["hf"]
    names = ["pair", "wide"]
    features = [qwen["processor"].prompt(qwen["samples"][n]) for n in names]
    batch = PadCollator(module.tokenizer.pad_token_id, padding_side="left")(features)
    assert not batch.attention_mask[:, -1].eq(0).any() and batch.attention_mask[1, 0] == 0
    steps = 8
    with torch.no_grad():
        ours = _greedy(module, batch, steps)
        # without a KV cache the generator recomputes whole prompts on M-RoPE positions it keeps
        assert _greedy(module, batch, steps, use_cache=False) == ours
        inputs = _hf_inputs(qwen, batch, names)
        generated = hf.generate(**inputs, max_new_tokens=steps, do_sample=False)
    theirs = generated[:, batch.input_ids.shape[1] :].tolist()
    eos = module.tokenizer.eos_token_id
    for a, b in zip(ours, theirs, strict=True):
        cut = a.index(eos) + 1 if eos in a else len(a)
        assert a[:cut] == b[:cut]


def test_mrope_positions_by_hand():
    """Text counts up; an item sits at start + (t·interval, row, column); text goes on from
    the item's largest position + 1, also when its temporal positions outrun its grid."""
    m = 9  # the media token
    ids = torch.tensor([1, 2, m, m, m, m, 3, m, m, m, m, 4])
    image, video = (1, 2, 2), (2, 1, 2)  # (t, h, w) merged tokens
    pos = sample_positions(ids, m, [image, video], [1.0, 4.0])
    assert pos.tolist() == [
        [0, 1, 2, 2, 2, 2, 4, 5, 5, 9, 9, 10],  # the video's second pair at 5 + 4
        [0, 1, 2, 2, 3, 3, 4, 5, 5, 5, 5, 10],
        [0, 1, 2, 3, 2, 3, 4, 5, 6, 5, 6, 10],
    ]
    # a fractional interval is floored per frame pair, in float32 (1.5 -> 0, 1, 3)
    assert item_positions((3, 1, 1), 1.5, 0)[0].tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="consecutive media tokens"):
        sample_positions(ids, m, [(1, 2, 3), video], [1.0, 1.0])


def test_positions_restart_per_packed_sample(qwen):
    module = qwen["module"]
    features = _features(qwen, ["pair", "text", "wide"])
    packed = PackCollator(module.tokenizer.pad_token_id, 4096).collate_rows([features])
    padded = PadCollator(module.tokenizer.pad_token_id)(features)
    four = module.model.position_ids(packed, module.image_token_id)  # [4, 1, L]
    row = four[1:, 0]  # [3, L]: M-RoPE
    alone = module.model.position_ids(padded, module.image_token_id)  # [3, B, L]
    start = 0
    for b, f in enumerate(features):
        n = len(f.input_ids)
        assert torch.equal(row[:, start : start + n], alone[:, b, :n])
        assert row[:, start].tolist() == [0, 0, 0]
        start += n
    # what the LLM gets for packed rows: the restarting text positions first
    assert four.shape[0] == 4 and torch.equal(four[0], packed.position_ids)


def test_sharded_text_only_batch_runs_the_tower(qwen, tmp_path):
    """FSDP2 on one gloo rank: a text-only training batch still runs the ViT and merger (weight
    0, so every rank joins their collectives), and the sharded model gives the same loss."""
    module = LMMModule(
        model=Qwen25VLModel(str(qwen["hf_dir"]), video_fps=FPS), tokenizer=str(qwen["hf_dir"])
    )
    text = _padded(qwen, ["text"])
    mixed = _padded(qwen, MIXED)
    with torch.no_grad():
        expected = module.loss(mixed)[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        module.model.shard(mesh, FSDP2Config())
        loss, _ = module.loss(text)
        loss.backward()
        grads = [p.grad for p in module.model.vision.parameters()]
        grads += [p.grad for p in module.model.connector.parameters()]
        assert all(g is not None for g in grads)
        assert all(float(g.full_tensor().abs().sum()) == 0.0 for g in grads)
        with torch.no_grad():
            torch.testing.assert_close(module.loss(mixed)[0], expected, **TOL)
    finally:
        dist.destroy_process_group()


def test_step_flops_counts_windows_and_trained_parts(qwen):
    module = qwen["module"]
    model = module.model
    batch = _padded(qwen, ["wide"])
    rows, grid = model.vision_inputs(batch)
    full, windows = model.vision.attention_lengths(grid)
    # 4 x 6 patches: one full sequence; 2 x 2 merged windows of a 2 x 3 grid: 16 + 8 patches
    assert grid.tolist() == [[1, 4, 6]] and full == [24] and windows == [16, 8]
    trained = model.step_flops(batch)
    text_only = model.step_flops(_padded(qwen, ["text"]))
    model.vision.requires_grad_(False)
    frozen_tower = model.step_flops(batch)
    model.vision.requires_grad_(True)
    conv = model.vision.patch_embed.proj.weight.numel()
    assert trained > frozen_tower > text_only > 0
    # freezing the tower drops its weight gradients (2 per weight and patch) and the backward
    # of its attention (scores' gradients: 3 x 4 of the 4 per pair) at least
    width = model.config.vision_config.hidden_size
    attention = 4 * width * (24**2 + 16**2 + 8**2)
    assert trained - frozen_tower >= 24 * 2 * conv + 2 * attention


def test_tied_head_imports(qwen, tmp_path):
    """A checkpoint with a tied head (Qwen2.5-VL-3B): imported, the head stays the embeddings."""
    src = build_tiny_qwen2_5_vl(tmp_path / "src", qwen["hf_dir"], tie_word_embeddings=True)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(src).eval()
    assert "lm_head.weight" not in load_file(src / "model.safetensors")
    import_checkpoint(src, tmp_path / "lmm")
    module = load_imported(tmp_path / "lmm").eval()
    llm = module.model.llm.model
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    batch = _padded(qwen, ["wide"])
    with torch.no_grad():
        ours = module(batch)
        theirs = hf(**_hf_inputs({**qwen, "hf": hf}, batch, ["wide"])).logits
    torch.testing.assert_close(ours, theirs, **TOL)
