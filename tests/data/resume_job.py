"""A training job for the exact-resume test: run, optionally SIGKILL itself at a step, resume.

Usage: python -m tests.data.resume_job ASSETS DATA OUT --max-steps N [--kill-at K] [--resume]
Appends `step loss.hex()` lines to OUT/losses.txt and saves the final weights to OUT/final.pt.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmm.data.datamodule import ChatDataModule
from lmm.data.templates import Llama3
from tests.helpers import tiny_llava


class Record(L.Callback):
    def __init__(self, path: Path, kill_at: int | None):
        self.path, self.kill_at = path, kill_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss']).hex()} {batch.ids}\n")
            f.flush()
            os.fsync(f.fileno())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("assets", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    assets = {k: a.assets / k for k in ("tokenizer", "llm", "vision")}
    module = tiny_llava(assets, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    data = ChatDataModule(
        template=Llama3(),
        train=str(a.data / "train.jsonl"),
        batch_size=2,
        num_workers=2,
        pack_tokens=160,
        max_length=160,
        buffer_size=8,
        streaming=True,
        seed=3,
    )
    ckpt_dir = a.out / "ckpt"
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=a.max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
        default_root_dir=a.out,
        callbacks=[
            Record(a.out / "losses.txt", a.kill_at),
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True),
        ],
    )
    trainer.fit(
        module, datamodule=data, ckpt_path=str(ckpt_dir / "last.ckpt") if a.resume else None
    )
    torch.save(module.state_dict(), a.out / "final.pt")


if __name__ == "__main__":
    main()
