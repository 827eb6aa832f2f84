"""One measured training run for test_plan_memory_matches_measured: one process, or one rank
of two under torchrun (FSDP2, gloo).

Usage: [torchrun --nproc-per-node 2] python -m tests.plan.memory_job ROOT OUT --steps N
[--checkpointing]. ROOT holds benchmarks/train_throughput.py's ~50M assets and mix. Each
process writes OUT/rank<R>.json: its RSS before the model is built and its high-water mark,
and what the prediction needs of the batch it trained on (sample lengths, labeled positions,
image tokens).

Run with glibc's `MALLOC_MMAP_THRESHOLD_` fixed (the test sets it): every allocation above it
is its own mapping, returned to the system when freed, so the RSS follows the live tensors.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    """benchmarks/NAME.py, loaded by path (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_lmm_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_mb() -> float:
    """This process's resident set now, MiB."""
    return _bench("memory").status_mb("VmRSS")


def peak_mb() -> float:
    """This process's RSS high-water mark, MiB (benchmarks/memory.py's `peak_mb`: VmHWM)."""
    return _bench("memory").peak_mb()


def throughput():
    """benchmarks/train_throughput.py: the ~50M LLaVA's sizes, assets and mix."""
    return _bench("train_throughput")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--pack-tokens", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true")
    a = p.parse_args()
    distributed = "RANK" in os.environ
    torch.set_num_threads(1 if distributed else 2)
    tt = throughput()
    assets = {k: a.root / "assets" / k for k in ("tokenizer", "vision", "llm")}
    data = tt.packed_data(
        a.root / "mix.json", a.rows, a.pack_tokens, argparse.Namespace(samples=64, seed=0)
    )
    # The batch needs the module's tokenizer and media spec: a first module makes it (and
    # loads every library the run uses), then goes; its memory returns to the system.
    module = tt.build_module(assets, 1e-4, 0)
    data.connect(module.tokenizer, module.media_spec(), module.image_token)
    batch = next(iter(data.train_stream()))
    del module
    gc.collect()
    before = rss_mb()
    module = tt.build_module(assets, 1e-4, 0)
    if distributed:
        train_fsdp2(module, batch, a)
    else:
        train_one(module, batch, a)
    views = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    seq, _ = module.model.vision_tokens()
    out = {
        "before_mb": before,
        "peak_mb": peak_mb(),
        "rows": batch.input_ids.shape[0],
        "tokens": batch.input_ids.shape[1],
        "samples": [int(n) for row in batch.seq_lens for n in row],
        "labeled": int((batch.labels[:, 1:] != -100).sum()),
        "image_tokens": views * seq,
    }
    rank = int(os.environ.get("RANK", 0))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{rank}.json").write_text(json.dumps(out))
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # see tests/training/fsdp_job.py: gloo threads at interpreter exit


def train_one(module, batch, a: argparse.Namespace) -> None:
    """`steps` AdamW steps on `batch` under bf16 autocast, as benchmarks/memory.py."""
    from lmm.training.strategies import apply_activation_checkpointing

    if a.checkpointing:
        apply_activation_checkpointing(module.model.llm.model)
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(a.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def train_fsdp2(module, batch, a: argparse.Namespace) -> None:
    """`steps` steps on `batch` under Lightning's FSDP2 strategy (`lmm fit`'s path)."""
    import lightning as L

    from lmm.training.strategies import FSDP2Config, FSDP2Strategy

    module.fsdp = FSDP2Config(activation_checkpointing=a.checkpointing)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        strategy=FSDP2Strategy(),
        precision="bf16-mixed",
        max_steps=a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # every rank trains on the same batch
    )
    loader = torch.utils.data.DataLoader([batch] * a.steps, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main()
