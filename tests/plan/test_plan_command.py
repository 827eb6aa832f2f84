"""`lmm plan`: the command's parameters and memory per GPU for a seed recipe at full size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmm import published
from lmm.cli import main
from lmm.plan import (
    GPUS,
    USABLE,
    PlanError,
    activation_constant,
    memory_per_gpu,
    meta_module,
    parameter_counts,
    state_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/mantis/stage2_siglip.yaml"


@pytest.fixture(scope="module")
def module():
    return meta_module(yaml.safe_load(RECIPE.read_text()), "stage2_siglip")


def test_plan_command_json(capsys, module):
    """`lmm plan --json` on 16xA100-40G: part 1's parameter counts, positive memory, and
    checkpointing keeping less activation memory; the largest micro-batch it names fits and
    one more row does not."""
    main(["plan", "--config", str(RECIPE), "--gpus", "16xA100-40G", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == parameter_counts(module)
    assert result["gpus"] == {
        "count": 16,
        "type": "A100-40G",
        "memory": GPUS["A100-40G"].memory,
        "usable": USABLE * GPUS["A100-40G"].memory,
        "peak_flops": 312e12,
    }
    on, off = (
        result["memory_per_gpu"]["checkpointing"],
        result["memory_per_gpu"]["no_checkpointing"],
    )
    for row in (on, off):
        assert all(v >= 0 for v in row.values()) and row["activations"] > 0, row
        assert row["total"] == pytest.approx(sum(v for k, v in row.items() if k != "total"))
    assert on["activations"] < off["activations"] and on["total"] < off["total"]
    for key in ("parameters", "gathered", "optimizer"):  # the rest: what is alive at the peak
        assert on[key] == off[key]
    usable = result["gpus"]["usable"]
    tokens = result["micro_batch"]["tokens_per_row"]
    for key, ckpt in (("checkpointing", True), ("no_checkpointing", False)):
        rows = result["largest_micro_batch"][key]

        def total(r, ckpt=ckpt):
            return memory_per_gpu(module, 16, True, r, tokens, ckpt)["total"]

        assert (rows == 0 or total(rows) <= usable) and total(rows + 1) > usable, key
    assert result["largest_micro_batch"]["checkpointing"] >= 1  # Mantis's run fits 16xA100-40G
    # time: every trained LLM weight costs 6 FLOPs per token (forward, both backward matmuls)
    time = result["time"]
    llm = parameter_counts(module)["llm"]["trainable"]
    assert 6 * llm * tokens < time["flops_per_row"] < 1.5 * 6 * llm * tokens
    assert time["rows_per_step"] == 2 * 8 * 16
    steps = 2 * 8 * time["flops_per_row"] / (312e12 * time["mfu"])
    assert time["seconds_per_step"] == pytest.approx(steps)


def test_plan_memory_monotone(module):
    """More GPUs: less memory per GPU (FSDP2 shards); DDP replicates; more rows or tokens:
    more activation memory."""
    totals = [memory_per_gpu(module, n, True, 1, 8192, True)["total"] for n in (1, 2, 8, 16, 64)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    ddp = [memory_per_gpu(module, n, False, 1, 8192, True)["total"] for n in (1, 16)]
    assert ddp[0] == ddp[1] > totals[-1]
    one = memory_per_gpu(module, 16, True, 1, 4096, True)
    assert memory_per_gpu(module, 16, True, 2, 4096, True)["activations"] > one["activations"]
    assert memory_per_gpu(module, 16, True, 1, 8192, True)["activations"] > one["activations"]
    # the weights alone, in 16 shards: bf16 vision tower and LLM, the connector in fp32
    parts = parameter_counts(module)
    weights = 2 * (parts["vision"]["parameters"] + parts["llm"]["parameters"])
    assert one["parameters"] == (weights + 4 * parts["connector"]["parameters"]) / 16
    grads = state_bytes(module, 16)["gradients"]
    assert grads == (2 * parts["llm"]["trainable"] + 4 * parts["connector"]["trainable"]) / 16
    assert one["optimizer"] == 2 * grads
    # at the peak: some of the gradients, plus the running layer's unsharded ones
    assert 0 < one["gradients"] < grads + 6 * 218_112_000  # a Llama-3-8B layer's parameters


def test_plan_activation_constant():
    """Llama-3-8B's layer on GPUs (bf16 stream): (12h + 2·(4h + 2kv) + 2·(h + 4I))/h bytes
    per token per hidden unit, with h 4096, kv 1024 (8 of 32 heads), I 14336 (the shipped
    config.json) = 51; on the CPU (fp32 stream) each norm keeps its normalized output in
    fp32 (+2·2h) and each projection casts its input (+2·3h) = 61. The count itself is checked against the tensors autograd
    keeps in test_plan_memory.py."""
    config = published.config("meta-llama/Meta-Llama-3-8B-Instruct")
    assert activation_constant(config) == pytest.approx(51.0, rel=1e-3)
    assert activation_constant(config, 4) == pytest.approx(61.0, rel=1e-3)
    # one LayerNorm, gelu_new (4 tensors of I = 4h), kv = h: 4 + 2·8 + 2·(1 + 20) = 62
    phi = published.config("microsoft/phi-2")
    assert activation_constant(phi) == pytest.approx(62.0, rel=1e-3)


def test_plan_bad_gpus():
    with pytest.raises(PlanError, match="Fix: e.g. --gpus 16xA100-40G"):
        main(["plan", "--config", str(RECIPE), "--gpus", "16xV100"])
