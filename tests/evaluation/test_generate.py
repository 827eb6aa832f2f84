"""Generation: batch invariance, KV cache == recompute, row-invariant kernels, sampling, stops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmm.data.collate import PadCollator
from lmm.data.sample import Sample, Turn
from lmm.generation.decode import (
    RowInvariant,
    cut_at_stop,
    row_attention,
    row_linear,
)
from lmm.training.module import LMMModule
from tests.helpers import generate_tokens, tiny_data, tiny_llava


@pytest.fixture(scope="module")
def setup(tiny_assets, synthetic_data):
    """The tiny LLaVA (eval mode), 14 prompts with 0-3 images of mixed lengths, a left-pad collator."""
    torch.manual_seed(0)
    module = tiny_llava(tiny_assets).eval()
    dm = tiny_data(synthetic_data, module)
    samples = dm.load("test")[:13]
    samples.append(Sample("text-only", [Turn("user", ["Which shape has more sides, a triangle?"])]))
    features = [dm.processor.prompt(s) for s in samples]
    module.template = dm.template
    return module, features, PadCollator(module.tokenizer.pad_token_id, "left")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a second OpenMP/MKL thread only waits for a core on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _answers(module, features, collate, bs, **kwargs):
    out = []
    for i in range(0, len(features), bs):
        out += module.generate(collate(features[i : i + bs]), **kwargs)
    return out


def _run(module, features, collate, bs, **kwargs):
    """Per prompt: its answer tokens and the logits of every decoding step ([T, V])."""
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(0, len(features), bs):
            for step in module.generation_stream(collate(features[i : i + bs]), **kwargs):
                for r, tok, row_logits in zip(step.rows, step.tokens, step.logits, strict=True):
                    tokens.setdefault(i + r, []).extend([] if tok is None else [tok])
                    logits.setdefault(i + r, []).append(row_logits)
    return tokens, {k: torch.stack(v) for k, v in logits.items()}


def test_batch_invariance(setup):
    module, features, collate = setup
    lengths = {len(f.input_ids) for f in features}
    images = {f.num_views for f in features}
    assert len(lengths) >= 5 and images == {0, 1, 2, 3}, (lengths, images)
    tokens_1, logits_1 = _run(module, features, collate, 1, max_new_tokens=10)
    tokens_7, logits_7 = _run(module, features, collate, 7, max_new_tokens=10)
    assert tokens_1 == tokens_7
    assert len({tuple(t) for t in tokens_1.values()}) > 3  # real, different answers
    # Not only the argmax: every logit of every step is bit-identical.
    assert all(torch.equal(logits_1[k], logits_7[k]) for k in logits_1)
    texts = _answers(module, features[:7], collate, 7, max_new_tokens=10)
    assert texts == _answers(module, features[:7], collate, 3, max_new_tokens=10)


def test_batch_invariance_with_grouped_query_attention(tiny_assets, synthetic_data, tmp_path):
    """A Qwen2 LLM with 2 kv heads for 4 query heads behind a SigLIP tower: still bit-exact."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmm.components.connectors import MLPConnector
    from lmm.components.language import CausalLM
    from lmm.components.vision import HFVisionTower
    from lmm.families.llava import LlavaModel
    from lmm.tiny import build_vision

    tokenizer = str(tiny_assets["tokenizer"])
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llm")
    vision = build_vision(tmp_path / "vision", "siglip", image_size=32, patch_size=8)
    model = LlavaModel(HFVisionTower(str(vision)), CausalLM(str(tmp_path / "llm")), MLPConnector)
    module = LMMModule(model=model, tokenizer=tokenizer).eval()
    dm = tiny_data(synthetic_data, module)
    features = [dm.processor.prompt(s) for s in dm.load("test")[:10]]
    collate = PadCollator(module.tokenizer.pad_token_id, "left")
    tokens_1, logits_1 = _run(module, features, collate, 1, max_new_tokens=6)
    tokens_5, logits_5 = _run(module, features, collate, 5, max_new_tokens=6)
    assert tokens_1 == tokens_5
    assert all(torch.equal(logits_1[k], logits_5[k]) for k in logits_1)


def test_kv_cache_equivalence(setup):
    module, features, collate = setup
    batch = features[:5]
    tokens, cached = _run(module, batch, collate, 5, max_new_tokens=8)
    tokens_full, full = _run(module, batch, collate, 5, max_new_tokens=8, use_cache=False)
    assert tokens == tokens_full
    for k in cached:
        assert cached[k].shape == full[k].shape == (8, cached[k].shape[1])
        torch.testing.assert_close(cached[k], full[k], atol=1e-4, rtol=1e-4)


def test_exact_kernels_compute_the_models_answers(setup):
    module, features, collate = setup
    tokens, exact = _run(module, features[:6], collate, 6, max_new_tokens=8)
    tokens_fast, fast = _run(
        module, features[:6], collate, 6, max_new_tokens=8, batch_invariant=False
    )
    assert tokens == tokens_fast
    for k in exact:
        torch.testing.assert_close(exact[k], fast[k], atol=1e-4, rtol=1e-4)


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [H, L_i, d] rows left-padded with zeros, and the key mask [B, 1, 1, L]."""
    longest = max(r.shape[-2] for r in rows)
    out = torch.zeros(len(rows), rows[0].shape[0], longest, rows[0].shape[-1])
    mask = torch.zeros(len(rows), 1, 1, longest, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :, longest - r.shape[-2] :] = r
        mask[i, ..., longest - r.shape[-2] :] = True
    return out, mask


def test_row_kernels_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    lengths = [3, 9, 5, 21, 1, 17, 12]
    # Linear over left-padded rows, in chunks: each row's positions as if it were alone.
    seqs = [torch.randn(n, 32) for n in lengths]
    x = torch.zeros(7, 21, 32)
    for i, seq in enumerate(seqs):
        x[i, 21 - len(seq) :] = seq
    for chunk in (1, 4, 16):
        batched = row_linear(x, weight, bias, chunk=chunk)
        for i, seq in enumerate(seqs):
            alone = row_linear(seq[None], weight, bias, chunk=chunk)[0]
            assert torch.equal(batched[i, 21 - len(seq) :], alone)
        torch.testing.assert_close(batched, F.linear(x, weight, bias))
    # Attention: decoding (one query) and prefill (causal, chunked queries), left-padded keys.
    keys = [torch.randn(4, n, 16) for n in lengths]
    values = [torch.randn(4, n, 16) for n in lengths]
    k, key_mask = _left_padded(keys)
    v, _ = _left_padded(values)
    q = torch.randn(7, 4, 1, 16)
    batched = row_attention(q, k, v, attn_mask=key_mask)
    for i in range(7):
        alone = row_attention(q[i : i + 1], keys[i][None], values[i][None])
        assert torch.equal(batched[i : i + 1], alone)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    torch.testing.assert_close(batched, reference, atol=1e-6, rtol=1e-5)
    queries = [torch.randn(4, n, 16) for n in lengths]
    qs, _ = _left_padded(queries)
    causal = torch.ones(21, 21, dtype=torch.bool).tril() & key_mask
    prefill = row_attention(qs, k, v, attn_mask=causal)
    for i, n in enumerate(lengths):
        alone = row_attention(queries[i][None], keys[i][None], values[i][None], is_causal=True)
        assert torch.equal(prefill[i : i + 1, :, 21 - n :], alone)
    assert torch.isfinite(prefill).all()  # pad queries attend to nothing: zeros, not NaN
    assert (prefill[4, :, :20] == 0).all()
    reference = F.scaled_dot_product_attention(qs[:1], k[:1], v[:1], attn_mask=causal[:1])
    torch.testing.assert_close(prefill[:1, :, -3:], reference[:, :, -3:], atol=1e-6, rtol=1e-5)


def test_grouped_query_attention_takes_one_form():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False
    # transformers passes `enable_gqa` without padding, packed query heads with a padding mask.
    plain = row_attention(q[1:], k[1:], v[1:], enable_gqa=True)
    packed = row_attention(q.reshape(3, 2, 4, 16), k, v, attn_mask=mask).reshape(3, 8, 1, 16)
    assert torch.equal(plain, packed[1:])
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(packed, reference, atol=1e-6, rtol=1e-5)
    prefill_q = torch.randn(3, 8, 10, 16)
    torch.testing.assert_close(
        row_attention(prefill_q, k, v, is_causal=True, enable_gqa=True),
        F.scaled_dot_product_attention(prefill_q, k, v, is_causal=True, enable_gqa=True),
        atol=1e-6,
        rtol=1e-5,
    )


def test_row_invariant_mode_leaves_other_ops_alone():
    x = torch.randn(2, 5, 8)
    with RowInvariant(chunk=4):
        assert torch.equal(torch.tanh(x), x.tanh())
        out = torch.nn.Linear(8, 3)(x)
    assert out.shape == (2, 5, 3)


def test_sampling_is_seeded_and_batch_invariant(setup):
    module, features, collate = setup
    batch = features[:4]
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9)
    a = _answers(module, batch, collate, 4, seed=3, **kw)
    assert a == _answers(module, batch, collate, 4, seed=3, **kw)
    assert a == _answers(module, batch, collate, 1, seed=3, **kw)  # per-sample generators
    assert a != _answers(module, batch, collate, 4, seed=4, **kw)
    greedy = _answers(module, batch, collate, 4, max_new_tokens=6)
    assert a != greedy
    # A nucleus so small that only the top token is left is greedy decoding.
    tiny_p = _answers(module, batch, collate, 4, max_new_tokens=6, temperature=1.0, top_p=1e-9)
    assert tiny_p == greedy


def test_stop_strings_tokens_and_length(setup):
    module, features, collate = setup
    batch = collate(features[:3])
    with torch.no_grad():
        embeds = module.model.embed(batch, module.image_token_id)
        free = generate_tokens(
            module.model.llm.model, embeds, batch.attention_mask, max_new_tokens=10
        )
        assert [len(t) for t in free] == [10, 10, 10]
        # A stop token ends a row and is not part of the answer.
        stopped = generate_tokens(
            module.model.llm.model,
            embeds,
            batch.attention_mask,
            max_new_tokens=10,
            stop_token_ids=[free[0][3]],
        )
    assert stopped[0] == free[0][:3]
    # A stop string (the decoded text of the answer's 3rd and 4th tokens) ends generation; the
    # text is cut before it.
    text = module.tokenizer.decode(free[0], skip_special_tokens=False)
    stop = module.tokenizer.decode(free[0][2:4], skip_special_tokens=False)
    module.generator.stop_strings = [stop]
    try:
        with torch.no_grad():
            steps = list(module.generation_stream(collate(features[:1]), 10))
        answer = module.generate(collate(features[:1]), 10)[0]
    finally:
        module.generator.stop_strings = None
    assert len(steps) < 10 and steps[-1].finished == [True]
    assert answer == text[: text.index(stop)]
    assert cut_at_stop("Red.</s>junk<|eot_id|>", ["<|eot_id|>", "</s>"]) == "Red."
