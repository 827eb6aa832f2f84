"""CausalLM: logits at chosen positions only (`logits_at`) equal the full logits there."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmm.components.language import PLAIN_HEADS, CausalLM
from lmm.components.losses import causal_lm_loss, selected_lm_loss, trained_positions
from lmm.families.llava import LlavaModel
from tests.helpers import tiny_data, tiny_llava

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("phi", {"num_key_value_heads": 4}),  # lm_head with a bias
        ("gemma2", {"final_logit_softcapping": 0.5, "head_dim": 8}),  # soft-capped logits
        ("persimmon", {"num_key_value_heads": 4}),
        ("cohere", {"logit_scale": 0.37}),  # not a plain head: computed whole, then selected
    ],
)
def test_logits_at_equal_full_logits(tmp_path, model_type, extra):
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    llm = CausalLM(str(tmp_path), attn_implementation="eager")
    assert (model_type in PLAIN_HEADS) == (model_type != "cohere")
    embeds = torch.randn(2, 7, 32, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    at = torch.zeros(2, 7, dtype=torch.bool)
    at[0, [1, 2, 6]] = True
    at[1, [0, 3]] = True
    full = llm.run(embeds, mask, None)
    picked = llm.run(embeds, mask, None, logits_at=at)
    assert picked.shape == (5, 97)
    torch.testing.assert_close(picked, full[at], rtol=0, atol=1e-6)
    (grad_full,) = torch.autograd.grad(full[at].square().sum(), embeds)
    (grad_picked,) = torch.autograd.grad(picked.square().sum(), embeds)
    torch.testing.assert_close(grad_picked, grad_full, rtol=1e-5, atol=1e-7)


def test_selected_loss_equals_full_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2] = -100  # a row with nothing to train
    at, targets = trained_positions(labels)
    assert not at[:, -1].any() and at[0].tolist() == [False, False, True, True, True, False]
    assert targets.tolist() == labels[0, 3:].tolist() + labels[1, 1:].tolist()
    total, n = causal_lm_loss(logits, labels)
    picked, m = selected_lm_loss(logits[at], targets)
    assert int(n) == int(m) == 8
    torch.testing.assert_close(picked, total, rtol=1e-6, atol=0)


@pytest.mark.parametrize("takes_logits_at", [True, False])
def test_module_loss_equals_full_logits_loss(tiny_assets, synthetic_data, takes_logits_at):
    """The training loss (logits at trained positions only) and its gradients equal the loss of
    the full logits, on a padded batch of images and text; also for a family model whose
    forward has no `logits_at` (the loss then selects from the full logits)."""
    module = tiny_llava(tiny_assets)
    if not takes_logits_at:

        class OldForward(LlavaModel):
            def forward(self, batch, image_token_id, attention_mask, return_hidden=False):
                assert not return_hidden
                return super().forward(batch, image_token_id, attention_mask)

        module.model.__class__ = OldForward
    dm = tiny_data(synthetic_data, module, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    params = [p for p in module.parameters() if p.requires_grad]
    loss, n = module.loss(batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    full_sum, full_n = causal_lm_loss(module(batch), batch.labels)
    full = full_sum / full_n
    full_grads = torch.autograd.grad(full, params, allow_unused=True)
    assert int(n) == int(full_n) > 0
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=0)
    for g, h in zip(grads, full_grads, strict=True):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    assert module.objective.head_tokens(module, batch) == int(n) < batch.num_tokens
