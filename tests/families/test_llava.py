"""The LLaVA family: equivalence with transformers, media scattering, errors, determinism."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from lmm.data.collate import PadCollator
from lmm.data.formats import load_samples
from lmm.training.module import LMMModule
from tests.helpers import (
    assert_logits_match_hf,
    compiled_llm_layers,
    quiet_trainer,
    tiny_data,
    tiny_llava,
)


def _batch(module, data, n=6):
    dm = tiny_data(data, module)
    samples = load_samples(data / "train.json")[:n]
    features = [dm.processor(s) for s in samples]
    return PadCollator(module.tokenizer.pad_token_id)(features), samples


def _hf_llava(module) -> LlavaForConditionalGeneration:
    """transformers' Llava with the weights of our tiny LLaVA family model."""
    ours = module.model
    config = LlavaConfig(
        vision_config=ours.vision.model.config,
        text_config=ours.llm.model.config,
        image_token_index=module.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    hf = LlavaForConditionalGeneration(config).eval()
    hf.model.vision_tower.load_state_dict(ours.vision.model.state_dict())
    hf.model.multi_modal_projector.load_state_dict(ours.connector.state_dict())
    hf.model.language_model.load_state_dict(ours.llm.model.model.state_dict())
    hf.lm_head.load_state_dict(ours.llm.model.lm_head.state_dict())
    return hf


@pytest.mark.parametrize("compiled", [False, True])
def test_llava_against_hf(tiny_assets, synthetic_data, compiled):
    torch.manual_seed(0)
    module = tiny_llava(tiny_assets).eval()
    batch, samples = _batch(module, synthetic_data)
    assert sum(batch.views_per_sample) > len(batch), "want multi-image rows in the batch"
    hf = _hf_llava(module)
    with compiled_llm_layers(module) if compiled else contextlib.nullcontext():
        ours = assert_logits_match_hf(module, hf, batch, rtol=1e-5, atol=1e-5)
    real = batch.attention_mask.bool()
    # the images matter: zeroing them changes the logits at text positions after the image
    batch.pixel_values = torch.zeros_like(batch.pixel_values)
    with torch.no_grad():
        blank = module(batch)
    assert not torch.allclose(blank[real], ours[real], atol=1e-4)


def test_text_only_and_image_rows_in_one_batch(tiny_assets, synthetic_data):
    from lmm.data.sample import Sample, Turn

    module = tiny_llava(tiny_assets).eval()
    dm = tiny_data(synthetic_data, module)
    image_sample = load_samples(synthetic_data / "train.json")[0]
    text_sample = Sample("text-1", [Turn("user", ["hello"]), Turn("assistant", ["red"])])
    feats = [dm.processor(text_sample), dm.processor(image_sample)]
    batch = PadCollator(module.tokenizer.pad_token_id)(feats)
    assert batch.views_per_sample == [0, image_sample.images.__len__()]
    with torch.no_grad():
        both = module(batch)
        alone = module(PadCollator(module.tokenizer.pad_token_id)(feats[:1]))
    n = len(feats[0].input_ids)
    torch.testing.assert_close(both[0, :n], alone[0, :n], rtol=1e-5, atol=1e-5)


def test_marker_feature_mismatch_names_the_sample(tiny_assets, synthetic_data):
    module = tiny_llava(tiny_assets).eval()
    batch, samples = _batch(module, synthetic_data, n=2)
    row = 1
    pos = (batch.input_ids[row] == module.image_token_id).nonzero()[0]
    batch.input_ids[row, pos] = module.tokenizer.pad_token_id  # one image token fewer
    with pytest.raises(ValueError, match=rf"sample '{samples[row].id}'.*image tokens"):
        module(batch)


def test_num_image_tokens_follows_vision_select(tiny_assets):
    module = tiny_llava(tiny_assets)
    spec = module.media_spec()
    # 32 px / patch 8 = 16 patches; CLIP adds CLS, `default` drops it
    assert spec.num_image_tokens((32, 32)) == 16
    module.model.vision.select = "full"  # the spec is a value: ask the model again
    assert module.media_spec().num_image_tokens((32, 32)) == 17
    pixels = torch.zeros(1, 3, 32, 32)
    assert module.model.encode_images(pixels).shape == (1, 17, 64)


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _run(tiny_assets, synthetic_data, tmp_path, seed: int) -> list[torch.Tensor]:
    L.seed_everything(seed)
    module = tiny_llava(tiny_assets, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = tiny_data(synthetic_data, batch_size=4, seed=seed)
    record = _Losses()
    trainer = quiet_trainer(tmp_path, 5, [record], deterministic=True)
    trainer.fit(module, datamodule=dm)
    return record.losses


def test_same_seed_same_losses(tiny_assets, synthetic_data, tmp_path):
    first = _run(tiny_assets, synthetic_data, tmp_path, seed=0)
    second = _run(tiny_assets, synthetic_data, tmp_path, seed=0)
    other = _run(tiny_assets, synthetic_data, tmp_path, seed=1)
    assert len(first) == 5
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # bitwise
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert first[-1] < first[0]


@pytest.mark.parametrize(("vision_type", "llm_type"), [("siglip", "qwen2"), ("clip", "phi")])
def test_other_towers_and_llms_train(tiny_assets, synthetic_data, tmp_path, vision_type, llm_type):
    from lmm.components.connectors import LinearConnector
    from lmm.components.language import CausalLM
    from lmm.components.vision import HFVisionTower
    from lmm.families.llava import LlavaModel
    from lmm.tiny import build_llm, build_vision

    vision = build_vision(tmp_path / "v", vision_type, image_size=32, patch_size=8)
    llm = build_llm(tmp_path / "l", tiny_assets["tokenizer"], llm_type)
    model = LlavaModel(
        HFVisionTower(str(vision), select="full"), CausalLM(str(llm)), LinearConnector
    )
    module = LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"]))
    # SigLIP has no CLS token: `full` keeps the 16 patches; CLIP adds one
    assert module.media_spec().num_image_tokens((32, 32)) == 16 + (vision_type == "clip")
    batch, _ = _batch(module, synthetic_data, n=4)
    loss, n = module.loss(batch)
    loss.backward()
    assert n > 0 and torch.isfinite(loss)
    assert model.vision.model.embeddings.patch_embedding.weight.grad is not None
