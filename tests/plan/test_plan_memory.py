"""`lmm plan`'s memory model against this machine: what a layer keeps, counted tensor by tensor,
and the peak of the ~50M benchmark LLaVA's training steps, measured, for one process and two
FSDP2 ranks, with and without activation checkpointing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmm.components.flops import layer_list, matmul_params
from lmm.components.language import CausalLM
from lmm.plan import CPU_RUNTIME, activation_bytes, memory_per_gpu
from lmm.tiny import build_llm, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def saved_bytes(model: torch.nn.Module, layers: torch.nn.ModuleList, **inputs) -> list[int]:
    """Bytes of the distinct storages the autograd graph keeps while each of `layers` runs."""
    seen: set[int] = set()
    kept = [0] * len(layers)
    where = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if where[0] >= 0 and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            kept[where[0]] += storage.nbytes()
        return t

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda *_: where.__setitem__(0, -1)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs)
    for h in hooks:
        h.remove()
    return kept


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "frozen"])
@pytest.mark.parametrize("model_type", ["llama", "phi"])
def test_plan_activation_bytes_counts_saved_tensors(tmp_path, model_type, trained):
    """What each decoder layer keeps for its backward pass under bf16 autocast over fp32
    weights (the CPU's facts: `CPU_RUNTIME`), counted by `saved_tensors_hooks` over a packed
    row of three samples, equals `activation_bytes(config, 4)` per token, plus the bf16
    copies of its weights and the attention probabilities of each sample, to 0.1%; frozen
    (a stage-1 LLM: no weight gradients, the activation gradients a trained connector before
    it needs), `activation_bytes(config, 4, trained=False)`. (The first layer also holds the
    rotary tables every layer reads: not compared.)"""
    tokenizer = build_tokenizer(["a b c d e f g"] * 4, tmp_path / "tok")
    path = build_llm(tmp_path / "llm", tokenizer, model_type, 64, 2, 4, intermediate=176)
    llm = CausalLM(str(path))  # sdpa_packed: the CPU kernel lmm trains with
    config = llm.model.config
    samples = [300, 200, 112]  # a row >= PER_SAMPLE_MIN_LENGTH: attended sample by sample
    position_ids = torch.cat([torch.arange(n) for n in samples])[None]
    ids = torch.randint(0, config.vocab_size, (1, sum(samples)))
    layers = layer_list(llm)
    for param in llm.parameters():
        param.requires_grad_(trained)
    embeds = llm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    kept = saved_bytes(llm.model, layers, inputs_embeds=embeds, position_ids=position_ids)
    heads = config.num_attention_heads
    for layer, measured in zip(layers[1:], kept[1:], strict=True):
        predicted = sum(samples) * activation_bytes(config, CPU_RUNTIME.param_bytes, trained)
        predicted += 2 * matmul_params(layer)[0] + 2 * heads * sum(n * n for n in samples)
        assert measured == pytest.approx(predicted, rel=0.001), (model_type, measured, predicted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(root: Path, out: Path, ranks: int, checkpointing: bool) -> list[dict]:
    """tests/plan/memory_job.py in its own process(es); every rank's figures."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        # every allocation above 64 KiB its own mapping: the RSS follows the live tensors
        # (glibc's default raises this threshold as blocks are freed, and its heap then keeps
        # freed activations: +25% at this size, varying with the allocation history)
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    job = ["-m", "tests.plan.memory_job", str(root), str(out), "--steps=2"]
    job += ["--checkpointing"] if checkpointing else []
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
        launch += ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    run = subprocess.run(
        launch + job, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
def test_plan_memory_matches_measured(tmp_path, capsys):
    """The ~50M benchmark LLaVA (benchmarks/train_throughput.py SIZES["50m"]: CLIP 256 x 4,
    Llama 640 x 10), 2 AdamW steps on 2 packed rows of 1024 tokens under bf16 autocast: the
    peak `memory_per_gpu` predicts (the same model as for GPUs, with the CPU's facts
    `CPU_RUNTIME` and the batch's sample lengths, trained positions and image tokens) is
    within 15% of the measured one, for one process and for each of 2 FSDP2 ranks (gloo,
    Lightning's ModelParallelStrategy), with and without activation checkpointing.

    Measured: the RSS high-water mark minus the RSS just before the model is built. By
    then the process has imported every library, built the batch, and built and freed a
    first copy of the model (the batch needs its tokenizer), so the difference is the model,
    its training state and the step's tensors, which is what the prediction counts (plus
    what the step's runtime allocates beside them: oneDNN, autograd, gloo and Lightning
    buffers). With glibc's mmap threshold fixed at 64 KiB (`_measure`), freed tensors leave
    the RSS at once, so it follows the live tensors."""
    tt = _throughput()
    tt.write_mix(tmp_path, 64, 0)
    tt.build_assets(tmp_path / "assets", "50m", 0)
    module = tt.build_module(
        {k: tmp_path / "assets" / k for k in ("tokenizer", "vision", "llm")}, 1e-4, 0
    )
    rows = []
    for ranks in (1, 2):
        for ckpt in (False, True):
            name = f"{ranks}_{'ckpt' if ckpt else 'full'}"
            for run in _measure(tmp_path, tmp_path / name, ranks, ckpt):
                predicted = (
                    memory_per_gpu(
                        module,
                        ranks,
                        ranks > 1,
                        run["rows"],
                        run["tokens"],
                        ckpt,
                        runtime=CPU_RUNTIME,
                        samples=run["samples"],
                        labeled=run["labeled"],
                        image_tokens=run["image_tokens"],
                    )["total"]
                    / MIB
                )
                measured = run["peak_mb"] - run["before_mb"]
                rows.append((ranks, ckpt, predicted, measured))
    table = ["ranks  checkpointing  predicted MiB  measured MiB  predicted/measured"]
    for ranks, ckpt, predicted, measured in rows:
        table.append(
            f"{ranks:>5}  {ckpt!s:>13}  {predicted:>13.0f}  {measured:>12.0f}  "
            f"{predicted / measured:.3f}"
        )
    with capsys.disabled():
        print("\n" + "\n".join(table))  # noqa: T201 (the table for docs/scaling.md)
    for ranks, ckpt, predicted, measured in rows:
        assert predicted == pytest.approx(measured, rel=0.15), (ranks, ckpt, predicted, measured)
    by = {(r, c): m for r, c, _, m in rows}
    assert by[(1, True)] < 0.75 * by[(1, False)] and by[(2, True)] < 0.75 * by[(2, False)]


def _throughput():
    from tests.plan.memory_job import throughput

    return throughput()
