"""The Q-Former family: equivalence with transformers' BLIP-2, VPG-C math, generation, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    Blip2ForConditionalGeneration,
)

from lmm.cli import LMMCLI
from lmm.components.connectors import LinearConnector
from lmm.components.language import CausalLM
from lmm.components.qformer import Blip2VisionTower, QFormer
from lmm.data.batch import Batch
from lmm.data.collate import PadCollator
from lmm.data.formats import load_samples
from lmm.data.packing import PackCollator
from lmm.families.qformer import QFormerModel
from lmm.tiny import build_tiny_blip2
from lmm.training.module import LMMModule
from tests.helpers import assert_logits_match_hf, tiny_data

TOL = dict(rtol=1e-5, atol=1e-5)
QUERIES = 8
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "qformer_synthetic.yaml"


@pytest.fixture(scope="module")
def blip2(tiny_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blip2")
    return build_tiny_blip2(out, tiny_assets["llm"], tiny_assets["tokenizer"], QUERIES)


def tiny_qformer(tiny_assets, blip2: Path, vpgc: bool = True, **kwargs) -> LMMModule:
    model = QFormerModel(
        vision=Blip2VisionTower(str(blip2)),
        qformer=QFormer(str(blip2)),
        llm=CausalLM(str(tiny_assets["llm"])),
        connector=LinearConnector,
        vpgc=vpgc,
    )
    return LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"]), **kwargs)


def _features(module, data, n=6, prompts=False):
    dm = tiny_data(data, module)
    samples = load_samples(data / "train.json")[:n]
    encode = dm.processor.prompt if prompts else dm.processor
    return [encode(s) for s in samples]


def _batch(module, data, n=6, prompts=False) -> Batch:
    """Right-padded training rows, or left-padded prompts (as generation takes them)."""
    side = "left" if prompts else "right"
    return PadCollator(module.tokenizer.pad_token_id, side)(_features(module, data, n, prompts))


def _randomise_vpgc(module, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.model.vpgc.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5


# --- BLIP-2 (VPG-C off) against transformers -------------------------------------------------


def test_blip2_against_hf(tiny_assets, synthetic_data, blip2):
    module = tiny_qformer(tiny_assets, blip2, vpgc=False).eval()
    hf = Blip2ForConditionalGeneration.from_pretrained(blip2).eval()
    module.model.connector.linear.load_state_dict(hf.language_projection.state_dict())
    batch = _batch(module, synthetic_data)
    assert sum(batch.views_per_sample) > len(batch), "want multi-image rows in the batch"
    assert int((batch.input_ids == module.image_token_id).sum()) == QUERIES * sum(
        batch.views_per_sample
    )
    ours = assert_logits_match_hf(module, hf, batch, **TOL)
    real = batch.attention_mask.bool()
    # the images matter: blank images change the logits after them
    batch.pixel_values = torch.zeros_like(batch.pixel_values)
    with torch.no_grad():
        blank = module(batch)
    assert not torch.allclose(blank[real], ours[real], atol=1e-4)


def test_parts_loaded_from_the_blip2_checkpoint(tiny_assets, blip2, tmp_path):
    hf = Blip2ForConditionalGeneration.from_pretrained(blip2)
    vision, qformer = Blip2VisionTower(str(blip2)), QFormer(str(blip2))
    assert torch.equal(qformer.query_tokens, hf.query_tokens)
    assert qformer.query_tokens.std() > 0.01
    hf_layer = hf.qformer.encoder.layer[0].crossattention.attention.key.weight
    assert torch.equal(qformer.model.encoder.layer[0].crossattention.attention.key.weight, hf_layer)
    assert torch.equal(vision.model.post_layernorm.weight, hf.vision_model.post_layernorm.weight)
    # 32 px / patch 8 = 16 patches + CLS, all kept; the Q-Former makes 8 tokens of any image
    assert vision.num_tokens((32, 32)) == 17
    assert vision(torch.zeros(2, 3, 32, 32)).shape == (2, 17, 32)
    # a folder holding the sub-model alone loads too; a bare Q-Former has no queries: random
    hf.vision_model.save_pretrained(tmp_path / "vision")
    hf.qformer.save_pretrained(tmp_path / "qformer")
    alone = Blip2VisionTower(str(tmp_path / "vision"))
    assert torch.equal(alone.model.post_layernorm.weight, hf.vision_model.post_layernorm.weight)
    bare = QFormer(str(tmp_path / "qformer"), num_queries=4)
    assert bare.query_tokens.shape == (1, 4, 32) and 0.01 < bare.query_tokens.std() < 0.03
    model = QFormerModel(vision, qformer, CausalLM(str(tiny_assets["llm"])), vpgc=False)
    assert model.media_spec().num_image_tokens((32, 32)) == QUERIES
    assert model.media_spec().transform.aspect == "resize"


# --- VPG-C -----------------------------------------------------------------------------------


def test_vpgc_zero_init_equals_off(tiny_assets, synthetic_data, blip2):
    torch.manual_seed(0)
    on = tiny_qformer(tiny_assets, blip2, vpgc=True)
    off = tiny_qformer(tiny_assets, blip2, vpgc=False)
    off.model.connector.load_state_dict(on.model.connector.state_dict())
    vpgc = on.model.vpgc
    assert on.model.update_layer == 1  # half of the 2 decoder layers
    assert not any(p.any() for p in (*vpgc.qformer_proj.parameters(), *vpgc.llm_proj.parameters()))
    # the new queries start from the Q-Former's, not from zero
    assert torch.equal(vpgc.query_tokens, on.model.qformer.query_tokens)
    assert vpgc.query_tokens.data_ptr() != on.model.qformer.query_tokens.data_ptr()
    batch = _batch(on, synthetic_data)
    on.eval(), off.eval()
    with torch.no_grad():
        assert torch.equal(on(batch), off(batch))
    # yet VPG-C is live: the output projection gets a gradient at once
    on.train()
    loss, _ = on.loss(batch)
    loss.backward()
    assert vpgc.llm_proj.weight.grad.abs().sum() > 0
    assert vpgc.qformer_proj.weight.grad.abs().sum() == 0  # behind the zero projection


def _reference_logits(module, batch: Batch) -> torch.Tensor:
    """VPG-C written out by hand: run the decoder layers one by one and add the residual."""
    model = module.model
    llm = model.llm.model  # LlamaForCausalLM
    vpgc = model.vpgc
    embeds = model.embed(batch, module.image_token_id)
    features = model.vision(batch.pixel_values)  # [N, 17, 32]
    pos = batch.position_ids
    rope = llm.model.rotary_emb(embeds, pos)
    hidden = embeds
    image = 0
    for i, layer in enumerate(llm.model.layers):
        if i == model.update_layer:
            hidden = hidden.clone()
            for b in range(len(batch)):
                trained = (batch.labels[b] != -100).nonzero()[0, 0]
                h = hidden[b, trained - 1]  # the last instruction token
                queries = (
                    vpgc.query_tokens[0] + h @ vpgc.qformer_proj.weight.T + vpgc.qformer_proj.bias
                )
                where = (batch.input_ids[b] == module.image_token_id).nonzero()[:, 0]
                for k in range(batch.views_per_sample[b]):
                    out = model.qformer.model(
                        query_embeds=queries[None],
                        encoder_hidden_states=features[image : image + 1],
                    ).last_hidden_state[0]
                    span = where[k * QUERIES : (k + 1) * QUERIES]
                    hidden[b, span] += out @ vpgc.llm_proj.weight.T + vpgc.llm_proj.bias
                    image += 1
        # right padding + a causal mask: real positions never see the pads
        hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=pos)
    return llm.lm_head(llm.model.norm(hidden))


def test_vpgc_matches_reference(tiny_assets, synthetic_data, blip2):
    module = tiny_qformer(tiny_assets, blip2).eval()
    _randomise_vpgc(module)
    batch = _batch(module, synthetic_data)
    with torch.no_grad():
        ours = module(batch)
        reference = _reference_logits(module, batch)
        off = tiny_qformer(tiny_assets, blip2, vpgc=False).eval()
        off.model.connector.load_state_dict(module.model.connector.state_dict())
        without = off(batch)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], reference[real], **TOL)
    assert not torch.allclose(ours[real], without[real], atol=1e-3), "VPG-C should act"
    # before the first image nothing changes (causal), after it everything does
    first = int((batch.input_ids[0] == module.image_token_id).nonzero()[0])
    torch.testing.assert_close(ours[0, :first], without[0, :first], **TOL)


def test_vpgc_instruction_depends_on_labels(tiny_assets, synthetic_data, blip2):
    module = tiny_qformer(tiny_assets, blip2)
    batch = _batch(module, synthetic_data, n=3)
    features = torch.zeros(sum(batch.views_per_sample), 17, 32)
    context = module.model.vpgc_batch_context(batch, module.image_token_id, features)
    for n, (b, t) in enumerate(
        zip(context.rows.tolist(), context.instruction.tolist(), strict=True)
    ):
        first_label = int((batch.labels[b] != -100).nonzero()[0])
        assert t == first_label - 1
        assert (batch.input_ids[b, context.positions[n]] == module.image_token_id).all()
    # a prompt (no labels, left-padded): its last real token, the row's last position
    prompts = _batch(module, synthetic_data, n=3, prompts=True)
    assert (prompts.attention_mask[:, -1] == 1).all() and (prompts.attention_mask[:, 0] == 0).any()
    context = module.model.vpgc_batch_context(prompts, module.image_token_id, features)
    assert context.instruction.tolist() == [prompts.input_ids.shape[1] - 1] * 3


def test_vpgc_packed_rows_equal_padded(tiny_assets, synthetic_data, blip2):
    module = tiny_qformer(tiny_assets, blip2).eval()
    _randomise_vpgc(module)
    features = _features(module, synthetic_data, n=4)
    padded = PadCollator(module.tokenizer.pad_token_id)(features)
    packed = PackCollator(module.tokenizer.pad_token_id, max_tokens=1024).collate_rows(
        [features[:2], features[2:]]
    )
    with torch.no_grad():
        a, b = module(padded), module(packed)
    start = {0: 0, 1: 0}
    for i, f in enumerate(features):
        row, n = i // 2, len(f.input_ids)
        torch.testing.assert_close(b[row, start[row] : start[row] + n], a[i, :n], **TOL)
        start[row] += n


def test_vpgc_generation_prefill_only(tiny_assets, synthetic_data, blip2):
    module = tiny_qformer(tiny_assets, blip2, max_new_tokens=4).eval()
    _randomise_vpgc(module)
    prompts = _batch(module, synthetic_data, n=3, prompts=True)
    with torch.no_grad():
        logits = module(prompts)  # teacher-forced prompt: VPG-C at the last prompt token
        first_steps = next(iter(module.generation_stream(prompts)))
        torch.testing.assert_close(first_steps.logits, logits[:, -1].float(), **TOL)
        cached = module.generate(prompts)
        recomputed = module.generate(prompts, use_cache=False)
    assert cached == recomputed
    assert module.model._context is None  # nothing left behind


def test_update_layer_out_of_range(tiny_assets, blip2):
    with pytest.raises(ValueError, match="update_layer=5 but the LLM has decoder layers 0..1"):
        QFormerModel(
            Blip2VisionTower(str(blip2)),
            QFormer(str(blip2)),
            CausalLM(str(tiny_assets["llm"])),
            update_layer=5,
        )


# --- training through the CLI ----------------------------------------------------------------


def test_tiny_recipe_trains_only_vpgc(tiny_assets, synthetic_data, blip2, tmp_path):
    args = [
        f"--config={RECIPE}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        f"--data.init_args.train={synthetic_data / 'train.json'}",
        f"--data.init_args.val={synthetic_data / 'val.json'}",
        f"--data.init_args.test={synthetic_data / 'test.json'}",
        "--data.init_args.batch_size=4",
        f"--model.init_args.tokenizer={tiny_assets['tokenizer']}",
        f"--model.init_args.model.init_args.vision.init_args.path={blip2}",
        f"--model.init_args.model.init_args.qformer.init_args.path={blip2}",
        f"--model.init_args.model.init_args.llm.init_args.path={tiny_assets['llm']}",
    ]
    cli = LMMCLI(args=args, run=False)
    module = cli.model
    assert isinstance(module, LMMModule)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.vpgc.query_tokens",
        "model.vpgc.qformer_proj.weight",
        "model.vpgc.qformer_proj.bias",
        "model.vpgc.llm_proj.weight",
        "model.vpgc.llm_proj.bias",
    }
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    # step 1 moves llm_proj off zero; step 2 then reaches the queries and qformer_proj
    assert changed == trainable


@pytest.mark.parametrize("recipe", ["vicuna.yaml", "llama2.yaml"])
def test_cheetah_recipe_trains_two_steps(recipe, tiny_assets, synthetic_data, blip2, tmp_path):
    cli = LMMCLI(
        args=[
            "fit",
            f"--config={RECIPE.parents[1] / 'cheetah' / recipe}",
            "--trainer.strategy=auto",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.tokenizer={tiny_assets['tokenizer']}",
            f"--model.init_args.model.init_args.vision.init_args.path={blip2}",
            "--model.init_args.model.init_args.vision.init_args.dtype=float32",
            f"--model.init_args.model.init_args.qformer.init_args.path={blip2}",
            f"--model.init_args.model.init_args.llm.init_args.path={tiny_assets['llm']}",
            "--model.init_args.model.init_args.llm.init_args.dtype=float32",
            "--model.init_args.model.init_args.update_layer=1",
            "--model.init_args.init_from=null",
            f"--data.init_args.train={synthetic_data / 'train.json'}",
            "--data.init_args.batch_size=2",
            "--data.init_args.max_length=256",
            "--data.init_args.pack_tokens=256",
            "--data.init_args.num_workers=0",
            # the tiny tokenizer has no SentencePiece model to encode with as Cheetah's slow one
            "--data.init_args.preprocessing.sentencepiece=off",
        ]
    )
    assert cli.trainer.global_step == 2
    assert cli.model.model.update_layer == 1
    assert {g["name"] for g in cli.trainer.optimizers[0].param_groups} == {"vpgc", "vpgc/no_decay"}


def test_vpgc_generation_without_cache(tiny_assets, synthetic_data, blip2, monkeypatch):
    """Rows that finish at different steps shrink the batch; without a cache every step runs
    the prompts again, and VPG-C must still apply to the rows left (it silently stopped)."""
    torch.manual_seed(0)  # the randomly initialised parts decide which row can stop early
    module = tiny_qformer(tiny_assets, blip2, max_new_tokens=6).eval()
    _randomise_vpgc(module)
    prompts = _batch(module, synthetic_data, n=3, prompts=True)
    with torch.no_grad():
        free = [step.tokens for step in module.generation_stream(prompts)]
    # a stop token that ends one row early and no other row before its last step
    rows = len(free[0])
    chosen = next(
        (r, k)
        for k in range(1, len(free) - 1)
        for r in range(rows)
        if all(
            free[k][r] not in [free[j][o] for j in range(len(free))] for o in range(rows) if o != r
        )
        and free[k][r] not in [free[j][r] for j in range(k)]
    )
    row, step = chosen
    monkeypatch.setattr(module.generator, "stop_token_ids", lambda stops: [free[step][row]])
    with torch.no_grad():
        cached = list(module.generation_stream(prompts))
        recomputed = list(module.generation_stream(prompts, use_cache=False))
    assert len(cached[-1].rows) < rows  # the batch shrank before the last step
    for a, b in zip(cached, recomputed, strict=True):
        assert a.rows == b.rows and a.tokens == b.tokens
        torch.testing.assert_close(a.logits, b.logits, **TOL)
