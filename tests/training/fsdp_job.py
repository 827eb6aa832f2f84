"""A training job for the FSDP2 tests: one process, or several under torchrun (FSDP2).

Usage: [torchrun ...] python -m tests.training.fsdp_job ASSETS DATA OUT --steps N --batch-size B
Rank 0 writes `step loss.hex()` lines (the global-batch mean loss) to OUT/losses.txt and the
full (unsharded) final weights to OUT/final.pt. `--ckpt-every K` saves a checkpoint every K
steps to OUT/ckpt (a sharded folder under FSDP2, with its `lmm_hashes.json`); `--resume PATH`
continues from one (its manifest checked first); `--lora` trains LoRA adapters and saves them to OUT/adapter.
`--meta-init` builds the model on the meta device on ranks other than 0 (FSDP2 `meta_init`)
and writes each rank's count of meta parameters after building to OUT/meta_rank<R>.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lmm.components.pretrained import empty_init
from lmm.data.datamodule import ChatDataModule
from lmm.data.templates import Llama3
from lmm.training.lora import LoraConfig, quantization_kwargs, save_adapter
from lmm.training.strategies import FSDP2Config, FSDP2Strategy
from tests.helpers import tiny_llava


class Record(L.Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        if dist.is_initialized():  # each rank holds its share of the global mean
            dist.all_reduce(loss)
            loss /= trainer.world_size
        if trainer.global_rank == 0:
            with self.path.open("a") as f:
                f.write(f"{trainer.global_step} {float(loss).hex()}\n")


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("assets", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument(
        "--lora", action="store_true", help="LoRA r=4 on the LLM; adapter to OUT/adapter"
    )
    p.add_argument("--qlora", action="store_true", help="--lora on a 4-bit nf4 LLM")
    p.add_argument("--meta-init", action="store_true", help="FSDP2 meta_init")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    L.seed_everything(0)
    assets = {k: a.assets / k for k in ("tokenizer", "llm", "vision")}
    lora = None
    if a.lora or a.qlora:
        quantize = "nf4" if a.qlora else None
        lora = LoraConfig(
            r=4,
            alpha=8,
            dropout=0.0,
            quantize=quantize,
            compute_dtype="float32",
            train_parts=["connector"],
        )
    with empty_init(a.meta_init):
        module = tiny_llava(
            assets,
            quantization=quantization_kwargs(lora) if a.qlora else None,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
            lora=lora,
            fsdp=FSDP2Config(meta_init=a.meta_init),
        )
    if a.meta_init:
        rank = os.environ.get("RANK", "0")
        meta = sum(p.is_meta for p in module.parameters())
        (a.out / f"meta_rank{rank}.txt").write_text(f"{meta} {len(list(module.parameters()))}")
    data = ChatDataModule(
        template=Llama3(),
        train=str(a.data / "train.jsonl"),
        batch_size=a.batch_size,
        streaming=True,
        buffer_size=1,  # keep file order, so the test decides which rank gets which sample
    )
    kwargs = {}
    if world > 1:
        nodes = world // int(os.environ["LOCAL_WORLD_SIZE"])
        kwargs = dict(
            devices=int(os.environ["LOCAL_WORLD_SIZE"]),
            num_nodes=nodes,
            strategy=FSDP2Strategy(),  # every rank data-parallel; sharded checkpoints hashed
        )
    callbacks = [Record(a.out / "losses.txt")]
    if a.ckpt_every:
        callbacks.append(
            ModelCheckpoint(a.out / "ckpt", every_n_train_steps=a.ckpt_every, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=a.steps,
        logger=False,
        enable_checkpointing=bool(a.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
        default_root_dir=a.out,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(module, datamodule=data, ckpt_path=a.resume)
    if lora is not None:  # every rank takes part (the shards are gathered); rank 0 writes
        save_adapter(module, a.out / "adapter")
    state = full_state(module)
    if trainer.global_rank == 0:
        torch.save(state, a.out / "final.pt")
    if dist.is_initialized():
        # Tear the process group down before exit: a rank leaving with gloo's threads still
        # running aborts ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
        # Some background thread (gloo / distributed checkpoint) can still abort in the C++
        # destructors at interpreter exit, rarely (seen once in ~10 runs after a sharded
        # checkpoint save). Everything is written and flushed by now: leave without them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
