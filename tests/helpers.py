"""Shared builders for tests: a tiny LMMModule and a connected data module."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from lmm.components.connectors import MLPConnector
from lmm.components.language import CausalLM
from lmm.components.losses import token_losses
from lmm.components.vision import HFVisionTower
from lmm.data.datamodule import ChatDataModule
from lmm.data.templates import Llama3
from lmm.families.llava import LlavaModel
from lmm.generation.decode import Prefill, stream_tokens
from lmm.training.module import LMMModule


def tiny_llava(assets: dict[str, Path], quantization: dict | None = None, **kwargs) -> LMMModule:
    model = LlavaModel(
        vision=HFVisionTower(str(assets["vision"]), feature_layer=-2),
        llm=CausalLM(str(assets["llm"]), quantization=quantization),
        connector=MLPConnector,
    )
    return LMMModule(model=model, tokenizer=str(assets["tokenizer"]), **kwargs)


def tiny_data(data: Path, module: LMMModule | None = None, **kwargs) -> ChatDataModule:
    dm = ChatDataModule(
        template=Llama3(),
        train=str(data / "train.json"),
        val=str(data / "val.json"),
        test=str(data / "test.json"),
        **kwargs,
    )
    if module is not None:
        dm.connect(module.tokenizer, module.media_spec(), module.image_token)
    return dm


def quiet_trainer(tmp_path: Path, max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    """A CPU Trainer for tests: no logger, checkpoints, progress bar, summary or validation."""
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        **kwargs,
    )


def assert_logits_match_hf(module, hf, batch, **tol) -> torch.Tensor:
    """Our logits equal a transformers model's on the batch's real tokens; returns ours."""
    with torch.no_grad():
        ours = module(batch)
        theirs = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
        ).logits
    real = batch.attention_mask.bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], **tol)
    return ours


def cpu_fit_args(tmp_path: Path, steps: int = 2) -> list[str]:
    """`lmm fit` overrides that run a recipe for `steps` steps on one CPU process, fp32, in tmp_path."""
    return [
        "--trainer.strategy=auto",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--trainer.max_steps={steps}",
        "--trainer.accumulate_grad_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


def tiny_llava_args(assets: dict[str, Path]) -> list[str]:
    """`lmm` CLI overrides that point a LLaVA recipe at the tiny tokenizer, tower and LLM."""
    return [
        f"--model.init_args.tokenizer={assets['tokenizer']}",
        f"--model.init_args.model.init_args.vision.init_args.path={assets['vision']}",
        f"--model.init_args.model.init_args.llm.init_args.path={assets['llm']}",
    ]


@torch.no_grad()
def generate_tokens(llm, inputs_embeds, attention_mask, **kwargs) -> list[list[int]]:
    """The answer tokens of each prompt (stop tokens excluded), via `stream_tokens`."""
    answers: list[list[int]] = [[] for _ in range(inputs_embeds.shape[0])]
    for step in stream_tokens(llm, Prefill(inputs_embeds, attention_mask), **kwargs):
        for r, tok in zip(step.rows, step.tokens, strict=True):
            if tok is not None:
                answers[r].append(tok)
    return answers


def per_sample_losses(
    logits: Tensor, labels: Tensor, seq_lens: Sequence[Sequence[int]] | None = None
) -> list[Tensor]:
    """Mean loss of every sample: one per row when padded, one per `seq_lens` entry when packed.

    Pad entries of packed rows (length-1 "samples" with no label) are skipped.
    """
    losses = token_losses(logits, labels)
    trained = labels != -100
    if seq_lens is None:
        return [losses[b].sum() / trained[b].sum().clamp(min=1) for b in range(len(labels))]
    out = []
    for b, lens in enumerate(seq_lens):
        start = 0
        for k in lens:
            n = trained[b, start : start + k].sum()
            if n > 0:
                out.append(losses[b, start : start + k].sum() / n)
            start += k
    return out


@contextmanager
def compiled_llm_layers(module):
    """The LLM's decoder layers compiled (`lmm.components.compiled`) inside the block; asserts
    that inductor compiled graphs for them (the test then runs the compiled path), and leaves
    dynamo's caches empty for the next test."""
    import torch._dynamo

    from lmm.components.compiled import compile_layers

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_layers(module.model.llm.model) > 0
    try:
        yield
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing compiled"
    finally:
        for layer in module.model.llm.model.model.layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()


@contextmanager
def running_server(command: list[str], env: dict, log: Path, ready_url: str, what: str):
    """Start `command` (a server) with its output in `log`, wait until `ready_url` answers 200
    (up to 180 s; the test fails with the log's tail if it exits or never answers), yield the
    process, then stop it."""
    import subprocess
    import time

    import httpx
    import pytest

    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)
