"""Training throughput of lmm vs transformers' Trainer on the same LLaVA and samples; MFU at ~50M.

Part 1, `speedup_vs_hf`: supervised (answer) tokens trained per second. One tiny-ish LLaVA
(CLIP 32 px / patch 8 = 16 tokens per image, width 128 x 4 layers; Llama width 256 x 4 layers,
as CPU.md section 10's tiny model, with LLaVA-1.5's 32,000-token vocabulary: `--vocab`; the
tiny tokenizer uses the first 372 ids) is built once and exported with `export_hf`; both sides start
from these weights and train one pass over the same N samples of the packing benchmark's
LLaVA-Instruct-like length mix (docs/benchmarks.md), with AdamW at the same lr, no weight
decay, no clipping, a constant schedule, in the same precision:
- lmm: what `lmm fit` runs — `LMMModule` + `ChatDataModule(pack_tokens=...)` (the resumable
  packed stream) under a Lightning `Trainer`;
- baseline: the exported `LlavaForConditionalGeneration` under the HF `Trainer` +
  `TrainingArguments`, random order, a padding collator, `--batch-size` samples per step. Its
  dataset encodes samples with lmm's processor (same tokens, labels and pixels), lazily, as
  lmm's stream does.
Times run from the trainers' train-start to train-end hooks (data loading included, one-time
setup not). The sides run interleaved, `--order` hf,lmm,hf,lmm, each run in a fresh process of
this script from the exported weights; `speedup_vs_hf` is the median of the runs' ratios,
`speedup_runs` each of them. Each side runs under the host allocator its users get: lmm's
runs under what the `lmm` command picks (jemalloc when installed, `lmm.utils.allocator`;
`--allocator`), the HF Trainer's under the system malloc, as `python train.py` runs
(`--hf-allocator lmm` gives it lmm's, to take the allocator out of the ratio). One more HF
run under lmm's allocator follows the interleaved ones: `speedup_vs_hf_same_allocator` is the
median lmm run over it, what lmm gains beside the allocator (`--no-same-allocator-run` skips
it). OpenMP's wait policy is left at libgomp's default for both (set OMP_WAIT_POLICY=PASSIVE on
a loaded machine). lmm runs with compiled decoder layers (`CausalLM(compile=True)`; `--no-compile` for eager): one
forward + backward before the run compiles them, timed apart (`warm_up_s_lmm`; inductor's
cache makes later runs' short).

Part 2, `mfu`: a ~50M-parameter LLaVA (ViT 256 x 4, Llama 640 x 10, intermediate 1728) trained
by lmm's Lightning path on packed rows of the same mix for `--mfu-windows` x `--mfu-window`
steps (compiled as in part 1, warm-up apart); `ThroughputMonitor` counts analytic FLOPs
(vision + connector + LLM, forward + backward) over each window and divides by the matmul peak
of the training dtype, measured before the first step and after each window (the best of a
2048² matmul and the model's four largest GEMM shapes at the row's tokens, `peak_shapes`; the
larger of the measurements around the window divides). `mfu` is the mean over the windows
after the first (which takes the allocator's and the loader's first steps), `mfu_windows` all
of them; `mfu_peak_spread` is the largest (max - min) / max of a counted window's two peaks and
`hfu` counts what activation checkpointing recomputes (none here: equal to `mfu`).
`mfu_ceiling` is the MFU of nothing but the model's GEMMs run back to back for about as long
as the window's matmuls take (`sustained_matmul_gflops` over the peak): CPUs lower their clock
under sustained vector load, so it sits below 1, and `mfu_of_ceiling` is `mfu` over it.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from transformers import (  # noqa: E402
    LlavaForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lmm.components.connectors import MLPConnector  # noqa: E402
from lmm.components.flops import matmul_params  # noqa: E402
from lmm.components.language import CausalLM  # noqa: E402
from lmm.components.vision import HFVisionTower  # noqa: E402
from lmm.data.datamodule import ChatDataModule  # noqa: E402
from lmm.data.formats import load_samples  # noqa: E402
from lmm.data.synthetic import generate, vocabulary  # noqa: E402
from lmm.data.templates import Llama3  # noqa: E402
from lmm.families.llava import LlavaModel  # noqa: E402
from lmm.families.llava.convert import export_hf  # noqa: E402
from lmm.tiny import build_llm, build_tokenizer, build_vision  # noqa: E402
from lmm.training.module import LMMModule  # noqa: E402
from lmm.training.throughput import (
    ThroughputMonitor,  # noqa: E402
    measure_sustained_flops,  # noqa: E402
)
from lmm.utils import allocator  # noqa: E402

# (vision width, vision layers, LLM width, LLM layers, LLM MLP width, heads)
SIZES = {
    "tiny": (128, 4, 256, 4, 688, 4),  # CPU.md section 10 "tiny LLaVA"
    "50m": (256, 4, 640, 10, 1728, 10),  # CPU.md section 10 "~50M LLaVA"
}


def make_records(n: int, images: list[str], words: list[str], seed: int) -> list[dict]:
    """The packing benchmark's LLaVA-Instruct-like mix (benchmarks/packing.py, beside this file)."""
    path = Path(__file__).with_name("packing.py")
    spec = importlib.util.spec_from_file_location("_lmm_bench_packing", path)
    packing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packing)
    return packing.make_records(n, images, words, seed)


def asset_paths(root: Path) -> dict[str, Path]:
    """Where `build_assets` writes under `root`."""
    return {name: root / name for name in ("tokenizer", "vision", "llm")}


def build_assets(root: Path, size: str, seed: int, vocab: int | None = None) -> dict[str, Path]:
    """Tokenizer, CLIP tower and Llama of `size` (`vocab` rows of embeddings and vocabulary
    projection; default the tokenizer's), written with `save_pretrained`."""
    if (root / "llm").is_dir():  # written by the parent process
        return asset_paths(root)
    v_width, v_layers, width, layers, mlp, heads = SIZES[size]
    tokenizer = build_tokenizer([" ".join(vocabulary())] * 4, root / "tokenizer")
    vision = build_vision(
        root / "vision", "clip", 32, 8, v_width, v_layers, heads=4, seed=seed
    )  # 32 px, patch 8: 16 tokens per image, as the mix assumes
    llm = build_llm(
        root / "llm",
        tokenizer,
        "llama",
        width,
        layers,
        heads,
        seed,
        intermediate=mlp,
        max_positions=4096,
        vocab_size=vocab,
    )
    return {"tokenizer": tokenizer, "vision": vision, "llm": llm}


def build_module(assets: dict[str, Path], lr: float, seed: int, compile: bool = False) -> LMMModule:
    """The lmm LLaVA on `assets` (2-layer MLP connector, as transformers' Llava), AdamW at `lr`;
    `compile`: compiled decoder layers (a recipe's `llm.init_args.compile: true`).

    Fused AdamW, as the HF Trainer's default `adamw_torch_fused`; in a recipe:
    `optimizer: {class_path: torch.optim.AdamW, init_args: {lr: ..., fused: true}}`.
    """
    torch.manual_seed(seed)
    model = LlavaModel(
        HFVisionTower(str(assets["vision"])),
        CausalLM(str(assets["llm"]), compile=compile),
        MLPConnector,
    )
    return LMMModule(
        model=model,
        tokenizer=str(assets["tokenizer"]),
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0, fused=True),
    )


def write_mix(root: Path, n: int, seed: int) -> Path:
    """The length mix of `n` samples over 32 synthetic images, as `root/mix.json`."""
    generate(root / "shapes", train=32, val=1, test=1, tasks=["colour"], seed=seed)
    images = [f"shapes/images/{p.name}" for p in sorted((root / "shapes/images").iterdir())]
    (root / "mix.json").write_text(json.dumps(make_records(n, images, vocabulary(), seed)))
    return root / "mix.json"


def lightning_trainer(precision: str, callbacks: list, **kwargs) -> L.Trainer:
    """A quiet single-process CPU Trainer, as `lmm fit` builds it (no logger or checkpoints)."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


class LightningMeter(L.Callback):
    """Train-loop wall time, steps, samples and supervised tokens of a Lightning run."""

    def __init__(self):
        self.start = self.end = 0.0
        self.steps = self.samples = self.supervised = self.slots = self.real = 0

    def on_train_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        rows = batch.seq_lens or [[1]] * len(batch)
        self.samples += (
            sum(1 for row in rows for k in row if k > 1) if batch.seq_lens else len(batch)
        )
        self.supervised += int((batch.labels[:, 1:] != -100).sum())
        self.slots += batch.input_ids.numel()
        self.real += batch.num_tokens

    def on_train_end(self, trainer, module) -> None:
        self.end = time.perf_counter()


def packed_data(mix: Path, rows: int, pack_tokens: int, a: argparse.Namespace) -> ChatDataModule:
    """`lmm fit`'s data path over the mix: `rows` packed rows of `pack_tokens` per step."""
    return ChatDataModule(
        template=Llama3(),
        train=str(mix),
        batch_size=rows,
        pack_tokens=pack_tokens,
        max_length=pack_tokens,
        buffer_size=a.samples,
        seed=a.seed,
    )


def warm_up(module: LMMModule, streams: list[ChatDataModule], precision: str) -> float:
    """Seconds of one forward + backward on the first batch of each stream (gradients dropped
    after): compiled layers compile here, outside the timed run. A stream of `rows` rows per
    step and one of a single row (a last step's; dynamic shapes specialise a size of 1) cover
    what the run meets. The timed run's stream starts afresh."""
    # Lightning's own autocast (its `cache_enabled=False` is part of what the graphs guard on)
    autocast = (
        MixedPrecision(precision, "cpu").autocast_context_manager()
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    start = time.perf_counter()
    for data in streams:
        data.connect(module.tokenizer, module.media_spec(), module.image_token)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        with autocast:
            loss, _ = module.loss(batch)
        loss.backward()
        module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def train_lmm(module: LMMModule, mix: Path, a: argparse.Namespace) -> dict:
    """One pass of `lmm fit`'s path over the mix: packed stream + Lightning Trainer."""
    streams = [packed_data(mix, rows, a.pack_tokens, a) for rows in sorted({a.rows, 1})]
    compile_s = warm_up(module, streams, a.precision)
    data = packed_data(mix, a.rows, a.pack_tokens, a)
    meter = LightningMeter()
    lightning_trainer(a.precision, [meter], max_epochs=1).fit(module, datamodule=data)
    seconds = meter.end - meter.start
    return {
        "seconds": seconds,
        "steps": meter.steps,
        "samples": meter.samples,
        "supervised_tokens": meter.supervised,
        "tokens_per_s": meter.supervised / seconds,
        "real_token_share": meter.real / meter.slots,
        "warm_up_s": compile_s,
    }


class HFChat(torch.utils.data.Dataset):
    """The mix encoded on access by lmm's processor, as plain dicts for the HF Trainer."""

    def __init__(self, samples, processor):
        self.samples, self.processor = samples, processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        f = self.processor(self.samples[i])
        return {"input_ids": f.input_ids, "labels": f.labels, "pixel_values": f.pixel_values}


class PadCollate:
    """The usual HF padding collator (right padding, -100 labels), counting what it hands out."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.supervised = self.slots = self.real = self.samples = 0

    def __call__(self, features: list[dict]) -> dict:
        pad = torch.nn.utils.rnn.pad_sequence
        ids = pad([f["input_ids"] for f in features], batch_first=True, padding_value=self.pad_id)
        labels = pad([f["labels"] for f in features], batch_first=True, padding_value=-100)
        mask = pad([torch.ones_like(f["input_ids"]) for f in features], batch_first=True)
        pixels = [f["pixel_values"] for f in features if f["pixel_values"] is not None]
        self.supervised += int((labels[:, 1:] != -100).sum())
        self.slots += ids.numel()
        self.real += int(mask.sum())
        self.samples += len(features)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


class HFMeter(TrainerCallback):
    """Train-loop wall time and steps of an HF Trainer run."""

    def __init__(self):
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


def train_hf(folder: Path, samples, processor, pad_id: int, out: Path, a) -> dict:
    """One pass of the HF Trainer over the same samples: random order, padded batches."""
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=a.batch_size,
        num_train_epochs=1,
        learning_rate=a.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # lmm's default Trainer does not clip either
        optim="adamw_torch_fused",  # the default; named so that it stays the same as lmm's
        bf16=a.precision == "bf16-mixed",
        use_cpu=True,
        seed=a.seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    collate, meter = PadCollate(pad_id), HFMeter()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=HFChat(samples, processor),
        data_collator=collate,
        callbacks=[meter],
    )
    trainer.train()
    seconds = meter.end - meter.start
    return {
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "seconds": seconds,
        "steps": meter.steps,
        "samples": collate.samples,
        "supervised_tokens": collate.supervised,
        "tokens_per_s": collate.supervised / seconds,
        "real_token_share": collate.real / collate.slots,
    }


def speedup(root: Path, a: argparse.Namespace) -> dict:
    """Part 1: the same weights and samples trained by lmm and by the HF Trainer."""
    mix = write_mix(root, a.samples, a.seed)
    assets = build_assets(root / "tiny", "tiny", a.seed, a.vocab or None)
    module = build_module(assets, a.lr, a.seed)
    export_hf(module, root / "hf")  # every run of both sides starts from these weights
    params = sum(p.numel() for p in module.parameters())
    vocab = module.model.llm.model.get_output_embeddings().out_features
    data = ChatDataModule(template=Llama3(), max_length=a.pack_tokens)
    data.connect(module.tokenizer, module.media_spec(), module.image_token)
    samples = load_samples(mix)
    lengths = sorted(data.processor.length(s) for s in samples)
    print(
        f"model {params / 1e6:.1f}M params (vocab {vocab}); {len(samples)} samples, "
        "tokens per sample: "
        f"median {lengths[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}, "
        f"max {lengths[-1]}; {a.precision}"
    )
    runs: dict[str, list[dict]] = {"hf": [], "lmm": []}
    for side in a.order.split(","):  # each run in a fresh process, from the exported weights
        r = run_child(side, root, a)
        runs[side].append(r)
        print(
            f"{side:>4}: {r['steps']} steps, {r['samples']} samples, {r['seconds']:.1f}s, "
            f"{r['tokens_per_s']:.0f} supervised tok/s, real tokens {r['real_token_share']:.1%}, "
            f"allocator {r['allocator']}"
            + (f", accelerate mixed precision {r['mixed_precision']}" if side == "hf" else "")
            + (f", warm-up (compilation) {r['warm_up_s']:.1f}s apart" if side == "lmm" else "")
        )
    if a.same_allocator_run and a.hf_allocator != "lmm":
        # the HF Trainer once more under lmm's allocator: what lmm gains beside the allocator
        r = run_child("hf", root, a, allocator_choice="lmm")
        runs["hf_same_allocator"] = [r]
        print(f"  hf under lmm's allocator ({r['allocator']}): {r['tokens_per_s']:.0f} tok/s")
    for lmm, hf in zip(runs["lmm"], runs["hf"], strict=True):
        if lmm["supervised_tokens"] != hf["supervised_tokens"] or lmm["samples"] != hf["samples"]:
            raise RuntimeError(
                f"the two sides trained different data: lmm {lmm['samples']} samples / "
                f"{lmm['supervised_tokens']} tokens, hf {hf['samples']} / "
                f"{hf['supervised_tokens']}"
            )
    return {"params": params, **runs, "max_tokens": lengths[-1], "vocab": vocab}


def child_run(side: str, root: Path, a: argparse.Namespace) -> dict:
    """One run of `side` (`lmm`, `hf` or `mfu`) on the files the parent wrote under `root`."""
    mix = root / "mix.json"
    if side == "mfu":
        return mfu(root, mix, a)
    assets = asset_paths(root / "tiny")
    if side == "lmm":
        return train_lmm(build_module(assets, a.lr, a.seed, a.compile), mix, a)
    module = build_module(assets, a.lr, a.seed)  # the tokenizer and processor lmm's side uses
    data = ChatDataModule(template=Llama3(), max_length=a.pack_tokens)
    data.connect(module.tokenizer, module.media_spec(), module.image_token)
    pad = module.tokenizer.pad_token_id
    return train_hf(root / "hf", load_samples(mix), data.processor, pad, root / "hf_out", a)


def run_child(
    side: str, root: Path, a: argparse.Namespace, allocator_choice: str | None = None
) -> dict:
    """`child_run(side)` in a new process of this script, under the host allocator the side
    runs with: lmm's what the `lmm` command picks (`lmm.utils.allocator`, `--allocator`); the
    HF Trainer's the system malloc, as `python train.py` runs it (`--hf-allocator lmm`: the
    same as lmm's; `allocator_choice` overrides either)."""
    env = {k: v for k, v in os.environ.items() if k != allocator.ACTIVE_ENV}
    choice = allocator_choice or (a.hf_allocator if side == "hf" else a.allocator)
    name, path = allocator.choose(a.allocator if choice == "lmm" else choice)
    env = allocator.environment(name, path, env) if path else {**env, allocator.ACTIVE_ENV: name}
    out = root / f"{side}.json"
    argv = [sys.executable, __file__, *a.argv, "--child", side, "--root", str(root)]
    subprocess.run(argv, env=env, check=True)
    return json.loads(out.read_text())


def mfu(root: Path, mix: Path, a: argparse.Namespace) -> dict:
    """Part 2: MFU of the ~50M config trained by lmm, against this run's matmul peak."""
    assets = build_assets(root / "m50", "50m", a.seed)
    module = build_module(assets, a.lr, a.seed, a.compile)
    params = sum(p.numel() for p in module.parameters())
    streams = [packed_data(mix, rows, a.mfu_pack_tokens, a) for rows in sorted({a.mfu_rows, 1})]
    warm = warm_up(module, streams, a.precision)
    print(
        f"~50M model: {params / 1e6:.1f}M params ({matmul_params(module)[0] / 1e6:.1f}M in "
        f"matmuls); warm-up (compilation) {warm:.1f}s"
    )
    data = packed_data(mix, a.mfu_rows, a.mfu_pack_tokens, a)
    # the peak: the best of a 2048² matmul and the model's own GEMMs, measured before the
    # first step and after each window; a window divides by the larger of the two around it
    monitor = ThroughputMonitor(log_every_n_steps=a.mfu_window, peak_budget=None)
    windows: list[dict] = []

    class Windows(L.Callback):
        """The monitor's logged figures after each window (the first one includes warm-up)."""

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if trainer.global_step % a.mfu_window == 0:
                m = trainer.callback_metrics
                windows.append({k: float(m[k]) for k in m if k.startswith("perf/")})

    trainer = lightning_trainer(
        a.precision, [monitor, Windows()], max_steps=a.mfu_windows * a.mfu_window, max_epochs=-1
    )
    trainer.fit(module, datamodule=data)
    # the first window takes the allocator's and the loader's first steps: the others count
    measured = windows[1:] or windows
    last = {k: statistics.fmean(w[k] for w in measured) for k in measured[0]}
    last["perf/peak_flops"] = max(w["perf/peak_flops"] for w in measured)
    last["perf/mfu_peak_spread"] = max(w["perf/mfu_peak_spread"] for w in measured)
    last["perf/achieved_flops"] = statistics.fmean(
        w["perf/mfu"] * w["perf/peak_flops"] for w in measured
    )
    # the ceiling: the same GEMMs kept up back to back for as long as a window's matmuls take
    matmul_s = min(
        10.0, max(2.0, 0.6 * a.mfu_window * last["perf/flops_per_step"] / last["perf/peak_flops"])
    )
    sustained = measure_sustained_flops(
        monitor.shapes,
        matmul_s,
        dtype=torch.bfloat16 if a.precision == "bf16-mixed" else torch.float32,
    )
    print(
        "  "
        + "; ".join(
            f"window {i + 1}: MFU {w['perf/mfu']:.1%} of {w['perf/peak_flops'] / 1e9:.0f} "
            f"GFLOP/s (peak spread {w['perf/mfu_peak_spread']:.1%}), "
            f"{w['perf/tokens_per_s']:.0f} tok/s, data wait {w['perf/data_wait_share']:.1%}"
            for i, w in enumerate(windows)
        )
    )
    print(
        f"  sustained matmuls ({matmul_s:.1f} s of the model's GEMMs): "
        f"{sustained / 1e9:.0f} GFLOP/s, {sustained / last['perf/peak_flops']:.1%} of the peak"
    )
    return {
        "params": params,
        "windows": windows,
        "sustained_flops": sustained,
        "sustained_s": matmul_s,
        "last": last,
        "warm_up_s": warm,
        "shapes": monitor.shapes,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512, help="samples each side trains on")
    p.add_argument("--batch-size", type=int, default=8, help="HF Trainer samples per step")
    p.add_argument("--pack-tokens", type=int, default=1024, help="lmm packed row length")
    p.add_argument("--rows", type=int, default=2, help="lmm packed rows per step")
    p.add_argument(
        "--vocab",
        type=int,
        default=32000,
        help="vocabulary of the speedup model (LLaVA-1.5's Vicuna: 32000; 0: the tiny "
        "tokenizer's 372)",
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"], default="bf16-mixed")
    p.add_argument(
        "--order",
        default="hf,lmm,hf,lmm",
        help="the runs, interleaved (as many of each side); speedup_vs_hf: the median ratio",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lmm with compiled decoder layers (CausalLM(compile=True); compilation timed "
        "apart, as warm_up_s)",
    )
    p.add_argument("--mfu-pack-tokens", type=int, default=2048)
    p.add_argument("--mfu-rows", type=int, default=1)
    p.add_argument("--mfu-window", type=int, default=8, help="steps per MFU window")
    p.add_argument(
        "--mfu-windows",
        type=int,
        default=3,
        help="MFU windows; the first is not counted (the allocator's and loader's first steps)",
    )
    p.add_argument(
        "--allocator",
        default="auto",
        help="host allocator of lmm's runs (LMM_ALLOCATOR: auto, jemalloc, tcmalloc, system)",
    )
    p.add_argument(
        "--hf-allocator",
        default="system",
        help="host allocator of the HF Trainer's runs: system (as `python train.py` runs), "
        "or lmm (the same as lmm's)",
    )
    p.add_argument(
        "--same-allocator-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one more HF run under lmm's allocator (speedup_vs_hf_same_allocator)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)  # one run, in a process of its own
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a < 1 minute smoke run")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.argv = list(argv)
    if a.quick:
        a.samples, a.mfu_window = 48, 1
    torch.set_num_threads(a.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if a.child:
        result = {**child_run(a.child, a.root, a), "allocator": allocator.loaded()}
        (a.root / f"{a.child}.json").write_text(json.dumps(result))
        return result
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        part1 = speedup(root, a)
        build_assets(root / "m50", "50m", a.seed)
        part2 = run_child("mfu", root, a)
    ratios = [
        lmm["tokens_per_s"] / hf["tokens_per_s"]
        for lmm, hf in zip(part1["lmm"], part1["hf"], strict=True)
    ]
    lmm, hf = part1["lmm"][-1], part1["hf"][-1]
    if "hf_same_allocator" in part1:
        other = part1["hf_same_allocator"][0]
        lmm_rate = statistics.median(r["tokens_per_s"] for r in part1["lmm"])
        same_allocator = {
            "speedup": round(lmm_rate / other["tokens_per_s"], 3),
            "tokens_per_s": round(other["tokens_per_s"], 1),
            "allocator": other["allocator"],
        }
    elif a.hf_allocator == "lmm":  # the main runs already share it
        same_allocator = {"speedup": round(statistics.median(ratios), 3), "tokens_per_s": None}
        same_allocator["allocator"] = hf["allocator"]
    else:
        same_allocator = {"speedup": None, "tokens_per_s": None, "allocator": None}
    last = part2["last"]
    result = {
        "speedup_vs_hf": round(statistics.median(ratios), 3),
        "speedup_runs": [round(r, 3) for r in ratios],
        "speedup_vs_hf_same_allocator": same_allocator["speedup"],
        "tokens_per_s_hf_same_allocator": same_allocator["tokens_per_s"],
        "allocator_hf_same_allocator": same_allocator["allocator"],
        "mfu": round(last["perf/mfu"], 4),
        "hfu": round(last["perf/hfu"], 4),
        "mfu_peak_spread": round(last["perf/mfu_peak_spread"], 4),
        "tokens_per_s_lmm": [round(r["tokens_per_s"], 1) for r in part1["lmm"]],
        "tokens_per_s_hf": [round(r["tokens_per_s"], 1) for r in part1["hf"]],
        "seconds_lmm": [round(r["seconds"], 2) for r in part1["lmm"]],
        "seconds_hf": [round(r["seconds"], 2) for r in part1["hf"]],
        "warm_up_s_lmm": [round(r["warm_up_s"], 2) for r in part1["lmm"]],
        "order": a.order,
        "compile": a.compile,
        "steps_lmm": lmm["steps"],
        "steps_hf": hf["steps"],
        "real_token_share_lmm": round(lmm["real_token_share"], 4),
        "real_token_share_hf": round(hf["real_token_share"], 4),
        "samples": lmm["samples"],
        "samples_per_step_lmm": round(lmm["samples"] / lmm["steps"], 2),
        "samples_per_step_hf": round(hf["samples"] / hf["steps"], 2),
        "max_tokens_per_sample": part1["max_tokens"],
        "hf_mixed_precision": hf["mixed_precision"],
        "supervised_tokens": lmm["supervised_tokens"],
        "params_speedup_model": part1["params"],
        "vocab_speedup_model": part1["vocab"],
        "batch_size_hf": a.batch_size,
        "pack_tokens_lmm": a.pack_tokens,
        "rows_lmm": a.rows,
        "precision": a.precision,
        "params_mfu_model": part2["params"],
        "peak_gflops": round(last["perf/peak_flops"] / 1e9, 1),
        "peak_shapes": [list(shape) for shape in part2["shapes"]],
        "achieved_gflops": round(last["perf/achieved_flops"] / 1e9, 1),
        "sustained_matmul_gflops": round(part2["sustained_flops"] / 1e9, 1),
        "mfu_ceiling": round(part2["sustained_flops"] / last["perf/peak_flops"], 4),
        "mfu_of_ceiling": round(last["perf/achieved_flops"] / part2["sustained_flops"], 4),
        "mfu_windows": [round(w["perf/mfu"], 4) for w in part2["windows"]],
        "mfu_peak_spreads": [round(w["perf/mfu_peak_spread"], 4) for w in part2["windows"]],
        "mfu_tokens_per_s": round(last["perf/tokens_per_s"], 1),
        "mfu_warm_up_s": round(part2["warm_up_s"], 2),
        "mfu_pack_tokens": a.mfu_pack_tokens,
        "mfu_rows": a.mfu_rows,
        "mfu_steps_per_window": a.mfu_window,
        "mfu_windows_counted": max(1, a.mfu_windows - 1),
        "threads": a.threads,
        "allocator_lmm": lmm["allocator"],
        "allocator_hf": hf["allocator"],
        "allocator_mfu": part2["allocator"],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp's default)"),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
