"""Transformers folders straight into lmm, lmm models out to transformers (Llava, LLaVA-OneVision,
Idefics2, Fuyu): the same prompt ids, logits to 1e-5 and the same greedy text.

Each case writes a tiny random transformers model with `save_pretrained`, with the tokenizer,
processor files and chat template its published repo has. transformers' side of each
comparison is built from the folder alone (its processor or image processor, its chat template),
so the folder's settings are tested, not lmm's reading of them twice.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    FuyuForCausalLM,
    FuyuProcessor,
    Idefics2ForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.utils.chat_template_utils import render_jinja_template

import lmm
from lmm.api import LMM
from lmm.cli import LMMCLI
from lmm.components.anyres import Anyres
from lmm.components.language import CausalLM
from lmm.components.vision import HFVisionTower
from lmm.convert import main as convert_main
from lmm.data.templates import build_template
from lmm.families.llava import LlavaModel
from lmm.families.llava.export import export_onevision
from lmm.families.qwen2_5_vl import Qwen25VLModel
from lmm.families.registry import ExportError
from lmm.generation.decode import cut_at_stop
from lmm.tiny import build_vision
from lmm.training.module import LMMModule
from tests.builders import (
    IDEFICS2_CHAT_TEMPLATE,
    build_fuyu_tokenizer,
    build_tiny_fuyu,
    build_tiny_idefics2,
    build_tiny_llava_hf,
    build_tiny_onevision_hf,
    build_tiny_qwen2_5_vl,
    fuyu_hf_inputs,
)
from tests.helpers import cpu_fit_args

TOL = dict(rtol=1e-5, atol=1e-5)
QUESTION = "What is in the picture?"
NEW_TOKENS = 6
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # 1x1 ... 1x3 tiles


# --- transformers' inputs, from a folder ----------------------------------------------------


def _user() -> list[dict]:
    """The probe prompt as transformers chat templates take it: one image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _llava_ids(folder: Path, image: Image.Image) -> dict:
    processor = AutoProcessor.from_pretrained(folder)  # LlavaProcessor, its chat template
    prompt = processor.apply_chat_template(_user(), add_generation_prompt=True)
    return dict(processor(images=[image], text=prompt, return_tensors="pt"))


def _llava_pixels(folder: Path, image: Image.Image) -> dict:
    return dict(AutoImageProcessor.from_pretrained(folder)(images=[image], return_tensors="pt"))


def _onevision_pixels(folder: Path, image: Image.Image) -> dict:
    pixels = LlavaOnevisionImageProcessorPil.from_pretrained(folder)([image], return_tensors="pt")
    return {**pixels, "batch_num_images": torch.tensor([1])}


def _onevision_ids(folder: Path, image: Image.Image) -> dict:
    """`LlavaOnevisionProcessor` for one image (it cannot be built without torchvision's video
    processor here): its chat template, its token count for the image, its tokenizer."""
    tok = AutoTokenizer.from_pretrained(folder)
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    (prompt,), _ = render_jinja_template(
        [_user()], chat_template=template, add_generation_prompt=True
    )
    settings = json.loads((folder / "processor_config.json").read_text())
    counter = object.__new__(LlavaOnevisionProcessor)
    counter.image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(folder)
    counter.num_image_tokens = settings["num_image_tokens"]
    counter.vision_aspect_ratio = settings["vision_aspect_ratio"]
    pixels = _onevision_pixels(folder, image)
    side = pixels["pixel_values"].shape[-1]
    n = counter._get_number_of_features(image.height, image.width, side, side)
    ids = tok(prompt.replace("<image>", "<image>" * n), return_tensors="pt")
    return {**ids, **pixels}


def _idefics2_ids(folder: Path, image: Image.Image) -> dict:
    processor = AutoProcessor.from_pretrained(folder)  # Idefics2Processor, its chat template
    prompt = processor.apply_chat_template(_user(), add_generation_prompt=True)
    return dict(processor(images=[[image]], text=[prompt], return_tensors="pt"))


def _idefics2_pixels(folder: Path, image: Image.Image) -> dict:
    return dict(AutoImageProcessor.from_pretrained(folder)([[image]], return_tensors="pt"))


def _fuyu_pixels(folder: Path, image_path: Path) -> dict:
    _, patches = fuyu_hf_inputs([image_path], FuyuImageProcessorPil.from_pretrained(folder))
    return {"pixel_values": patches[0][None]}


def _fuyu_ids(folder: Path, image_path: Path) -> dict:
    """FuyuProcessor's prompt (`<image>` + question + `<0x04>`, the image as its patch rows and
    `<s>`); its own call needs torchvision here, so its image text is built with its method."""
    ip = FuyuImageProcessorPil.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    processor = FuyuProcessor(image_processor=ip, tokenizer=tok)
    image = Image.open(image_path).convert("RGB")
    out = ip([image])
    patch = ip.patch_size["height"]
    new_h = min(ip.size["height"], -(-out["image_unpadded_heights"][0][0] // patch) * patch)
    new_w = min(ip.size["width"], -(-out["image_unpadded_widths"][0][0] // patch) * patch)
    text = processor.replace_image_token(
        out, 0, num_patches=ip.get_num_patches(new_h, new_w), row_width=new_w // patch
    )
    ids = tok(text + QUESTION + "<0x04>", add_special_tokens=False, return_tensors="pt")
    return {**ids, **_fuyu_pixels(folder, image_path)}


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, dict, Path], Path]  # (out, tiny assets, scratch) -> the folder
    hf_class: type
    size: tuple[int, int]  # (height, width) of the test image
    content: str  # the user message as lmm takes it (images without a marker go first + "\n")
    hf_ids: Callable  # (folder, image) -> transformers' inputs for the prompt, ids included
    hf_pixels: Callable  # (folder, image) -> transformers' image inputs alone
    pil: bool = True  # hf_* take a PIL image (else the path)


def _build_llava(out: Path, assets: dict, scratch: Path) -> Path:
    return build_tiny_llava_hf(out, assets["tokenizer"], assets["vision"])


def _build_onevision(out: Path, assets: dict, scratch: Path) -> Path:
    siglip = build_vision(scratch / "siglip", "siglip", image_size=32, patch_size=8)
    return build_tiny_onevision_hf(out, assets["tokenizer"], siglip, PINPOINTS)


def _build_idefics2(out: Path, assets: dict, scratch: Path) -> Path:
    return build_tiny_idefics2(out, assets["tokenizer"], chat_template=IDEFICS2_CHAT_TEMPLATE)


def _build_fuyu(out: Path, assets: dict, scratch: Path) -> Path:
    build_tiny_fuyu(out, build_fuyu_tokenizer(assets["tokenizer"], scratch / "tok"))
    return out


CASES = {
    "llava": Case(
        _build_llava, LlavaForConditionalGeneration, (40, 50), QUESTION, _llava_ids, _llava_pixels
    ),
    "onevision": Case(  # 2 x 3 tiles, unpadded and shrunk (anyres_max_2)
        _build_onevision,
        LlavaOnevisionForConditionalGeneration,
        (40, 90),
        QUESTION,
        _onevision_ids,
        _onevision_pixels,
    ),
    "idefics2": Case(
        _build_idefics2,
        Idefics2ForConditionalGeneration,
        (24, 40),
        f"<image>{QUESTION}",
        _idefics2_ids,
        _idefics2_pixels,
    ),
    "fuyu": Case(
        _build_fuyu,
        FuyuForCausalLM,
        (30, 50),
        f"<image>{QUESTION}",
        _fuyu_ids,
        _fuyu_pixels,
        pil=False,
    ),
}


@pytest.fixture(scope="module")
def built(tiny_assets, tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """(transformers folder, test image) of a case, written once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            folder = CASES[name].build(root / "hf", tiny_assets, root)
            h, w = CASES[name].size
            pixels = np.random.default_rng(len(name)).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "image.png")
            made[name] = (folder, root / "image.png")
        return made[name]

    return get


def _image_arg(case: Case, path: Path):
    return Image.open(path).convert("RGB") if case.pil else path


def _messages(case: Case) -> list[dict]:
    return [{"role": "user", "content": case.content}]


def _hf_greedy(hf, inputs: dict, model: LMM) -> str:
    """transformers' greedy answer, ended as lmm ends one (stop tokens and stop strings)."""
    stops = model.template.stop_strings
    stop_ids = model.module.generator.stop_token_ids(stops)
    with torch.no_grad():
        out = hf.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop_ids
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))]
    return cut_at_stop(model.module.tokenizer.decode(new, skip_special_tokens=False), stops)


def _compare(model: LMM, hf, inputs: dict, image: Path, case: Case) -> None:
    """lmm's logits for the prompt equal transformers' on `inputs`, and so do the greedy answers."""
    batch = model.batch([model.sample(_messages(case), [image])])
    assert batch.input_ids.tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        ours = model.module(batch)
        theirs = hf(**inputs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **TOL)
    # the image reaches the logits (the comparison covers the vision path)
    batch.pixel_values = torch.zeros_like(batch.pixel_values)
    with torch.no_grad():
        assert not torch.allclose(model.module(batch)[0, -1], ours[0, -1], atol=1e-4)
    answer = model.generate(_messages(case), [image], max_new_tokens=NEW_TOKENS)
    assert answer and answer == _hf_greedy(hf, inputs, model)


# --- load ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_load_transformers_folder(built, name):
    """`lmm.load(folder)` of a save_pretrained folder: transformers' prompt ids (chat template and
    processor), logits and greedy text."""
    case = CASES[name]
    folder, image = built(name)
    model = lmm.load(folder)
    hf = case.hf_class.from_pretrained(folder).eval()
    _compare(model, hf, case.hf_ids(folder, _image_arg(case, image)), image, case)


# --- export -------------------------------------------------------------------------------------


def _perturbed(model: LMM, seed: int) -> LMM:
    """A copy of the model with every weight moved (as a fine-tune would move it)."""
    module = copy.deepcopy(model.module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return LMM(module, model.template)


@pytest.mark.parametrize("name", list(CASES))
def test_export_transformers(built, name, tmp_path):
    """A fine-tuned lmm model (a recipe with `init_from_transformers`, its checkpoint) exported
    by `lmm convert export`: `from_pretrained` of the folder gives its logits and greedy text,
    with pixels from the exported image processor."""
    case = CASES[name]
    folder, image = built(name)
    model = _perturbed(lmm.load(folder), seed=1)
    recipe = tmp_path / "recipe.yaml"
    module = {"class_path": "lmm.LMMModule", "init_args": {"init_from_transformers": str(folder)}}
    recipe.write_text(yaml.safe_dump({"model": module}))
    ckpt = tmp_path / "fine-tuned.ckpt"
    torch.save({"state_dict": model.module.state_dict()}, ckpt)
    args = ["export", "--config", str(recipe), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]
    exported = convert_main(args)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [case.hf_class.__name__]
    hf = case.hf_class.from_pretrained(exported).eval()
    batch = model.batch([model.sample(_messages(case), [image])])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    inputs |= case.hf_pixels(exported, _image_arg(case, image))
    _compare(model, hf, inputs, image, case)


def test_export_onevision_adds_the_video_token(built, tiny_assets, tmp_path):
    """A OneVision model whose tokenizer has no `<video>` (lmm marks videos with `<image>`)
    exports with one: its rows copy `<image>`'s, so transformers' logits over lmm's vocabulary
    and its greedy answer are lmm's."""
    case = CASES["onevision"]
    folder, image = built("onevision")
    siglip = next(folder.parent.glob("siglip"))
    torch.manual_seed(0)
    model = LlavaModel(
        vision=HFVisionTower(str(siglip), feature_layer=-1, select="full"),
        llm=CausalLM(str(tiny_assets["llm"])),
        anyres=functools.partial(Anyres, grid_pinpoints=PINPOINTS, max_tiles=2),
    )
    module = LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"])).eval()
    assert "<video>" not in module.tokenizer.get_vocab()
    vocab = len(module.tokenizer)
    ours = LMM(module, build_template({"class_path": "lmm.data.templates.ChatML"}))
    exported = export_onevision(module, tmp_path / "hf")
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(exported).eval()
    video = AutoTokenizer.from_pretrained(exported).convert_tokens_to_ids("<video>")
    assert video == vocab == hf.config.video_token_index
    batch = ours.batch([ours.sample(_messages(case), [image])])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    inputs |= case.hf_pixels(exported, _image_arg(case, image))
    with torch.no_grad():
        logits = module(batch)
        theirs = hf(**inputs).logits
    assert theirs.shape[-1] == vocab + 1
    torch.testing.assert_close(logits, theirs[..., :vocab], **TOL)
    torch.testing.assert_close(theirs[..., video], theirs[..., module.image_token_id])
    answer = ours.generate(_messages(case), [image], max_new_tokens=NEW_TOKENS)
    assert answer == _hf_greedy(hf, inputs, ours)


def test_export_refuses_what_transformers_cannot_express(built, tiny_assets, tmp_path, capsys):
    """OneVision settings transformers has no field for are ExportErrors naming them; from
    `lmm convert export` they exit 2 with that one line."""
    folder, _ = built("onevision")
    model = lmm.load(folder)
    for attr, value, setting in [
        ("video_newline", "grid", "video_newline 'grid'"),
        ("video_stride", 3, "video_stride 3"),
        ("max_tiles", None, "max_tiles null"),
    ]:
        module = copy.deepcopy(model.module)
        setattr(module.model.anyres, attr, value)
        with pytest.raises(ExportError, match=setting):
            export_onevision(module, tmp_path / attr)
        assert not (tmp_path / attr).exists()
    # the quickstart's connector merges 2 x 2 tokens: Llava cannot
    recipe = tmp_path / "recipe.yaml"
    llava = {
        "vision": {
            "class_path": "lmm.components.vision.HFVisionTower",
            "init_args": {"path": str(tiny_assets["vision"])},
        },
        "llm": {
            "class_path": "lmm.components.language.CausalLM",
            "init_args": {"path": str(tiny_assets["llm"])},
        },
        "connector": {
            "class_path": "lmm.components.connectors.MLPConnector",
            "init_args": {"merge": 2},
        },
    }
    module = {
        "class_path": "lmm.LMMModule",
        "init_args": {
            "tokenizer": str(tiny_assets["tokenizer"]),
            "model": {"class_path": "lmm.families.llava.LlavaModel", "init_args": llava},
        },
    }
    recipe.write_text(yaml.safe_dump({"model": module}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        convert_main(["export", "--config", str(recipe), "--out", str(tmp_path / "hf")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lmm convert export:")]
    assert len(lines) == 1 and "MLPConnector merge 2" in lines[0]
    assert err.strip().splitlines()[-1] == lines[0]  # the last word, on one line
    assert not (tmp_path / "hf").exists()


def test_folder_of_another_class_is_refused(tiny_assets, tmp_path):
    with pytest.raises(ValueError) as err:
        lmm.load(tiny_assets["llm"])
    message = str(err.value)
    assert "a transformers LlamaForCausalLM" in message and "Fix:" in message
    assert "LlavaOnevisionForConditionalGeneration, Idefics2ForConditionalGeneration" in message
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lmm.load(tmp_path)  # an empty folder


def test_hub_id_reads_the_hub_cache(built, tmp_path, monkeypatch):
    """A hub id loads from its hub-cache snapshot offline, as the folder it is; an id that is
    not there says how to get it."""
    folder, image = built("llava")
    repo = tmp_path / "hub" / "models--someone--tiny-llava"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id, by_folder = lmm.load("someone/tiny-llava"), lmm.load(folder)
    batch = by_folder.batch([by_folder.sample(_messages(CASES["llava"]), [image])])
    with torch.no_grad():
        torch.testing.assert_close(by_id.module(batch), by_folder.module(batch), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"someone/missing: not a local folder.*Fix:"):
        lmm.load("someone/missing")


def test_import_names_the_chat_template(built, tmp_path):
    """`lmm convert import` of a transformers folder writes the lmm template its chat template
    renders as; `lmm.load(out)` then needs no template= and answers as the folder does."""
    folder, image = built("llava")
    recipe = convert_main(
        ["import", "--layout", "mantis", "--src", str(folder), "--out", str(tmp_path / "out")]
    )
    template = yaml.safe_load(recipe.read_text())["data"]["init_args"]["template"]
    assert template == {
        "class_path": "lmm.data.templates.VicunaV1",
        "init_args": {"system": "", "bos": ""},  # LLaVA-1.5's `USER: ... ASSISTANT:`
    }
    messages = _messages(CASES["llava"])
    imported, direct = lmm.load(tmp_path / "out"), lmm.load(folder)
    assert imported.generate(messages, [image], max_new_tokens=4) == direct.generate(
        messages, [image], max_new_tokens=4
    )


def test_recipe_init_from_transformers_trains(built, synthetic_data, tmp_path):
    """A recipe whose model is `init_from_transformers: FOLDER` fits (2 steps), and `model` given
    beside it is refused."""
    folder, _ = built("llava")
    recipe = {
        "model": {
            "class_path": "lmm.LMMModule",
            "init_args": {"init_from_transformers": str(folder), "freeze": ["vision"]},
        },
        "data": {
            "class_path": "lmm.data.datamodule.ChatDataModule",
            "init_args": {
                "template": {
                    "class_path": "lmm.data.templates.VicunaV1",
                    "init_args": {"system": ""},
                },
                "train": str(synthetic_data / "train.json"),
                "batch_size": 2,
                "num_workers": 0,
            },
        },
        "trainer": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path)},
            }
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cli = LMMCLI(args=[f"--config={tmp_path / 'recipe.yaml'}", *cpu_fit_args(tmp_path)], run=False)
    module = cli.model
    hf = LlavaForConditionalGeneration.from_pretrained(folder)
    torch.testing.assert_close(  # the folder's weights, the connector's (init_from) included
        module.model.connector.linear_2.weight, hf.model.multi_modal_projector.linear_2.weight
    )
    before = module.model.connector.linear_1.weight.detach().clone()
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert not torch.equal(module.model.connector.linear_1.weight, before)
    with pytest.raises(ValueError, match=r"init_from_transformers \(.*\) builds the model"):
        LMMModule(model=module.model, init_from_transformers=str(folder))
    with pytest.raises(ValueError, match="LMMModule needs model.init_args.model"):
        LMMModule(tokenizer=str(folder))


def test_load_qwen2_5_vl_folder(tiny_assets, tmp_path):
    """The fifth class read directly: a Qwen2.5-VL folder (no chat template) loads as the
    qwen2_5_vl family with its importer's template, and answers."""
    folder = build_tiny_qwen2_5_vl(tmp_path / "hf", tiny_assets["tokenizer"])
    model = lmm.load(folder)
    assert isinstance(model.module.model, Qwen25VLModel)
    assert type(model.template).__name__ == "ChatML"
    image = tmp_path / "image.png"
    Image.fromarray(np.full((56, 56, 3), 200, dtype=np.uint8)).save(image)
    assert isinstance(
        model.generate([{"role": "user", "content": QUESTION}], [image], max_new_tokens=2), str
    )
