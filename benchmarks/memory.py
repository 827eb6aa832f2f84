"""Peak memory of lmm training steps with and without activation checkpointing (same model, batch).

Each configuration runs in its own child process, which builds the model, takes the first
batch of lmm's packed training stream over the packing benchmark's length mix, and trains
`--steps` AdamW steps (bf16 autocast by default). Memory is the process's RSS high-water mark
(`VmHWM` of /proc/self/status, read in the child): torch has no CPU allocator
statistics to read, and the high-water mark is what decides whether a run fits in RAM. It
includes Python, torch, the weights, gradients and AdamW state, so `baseline_mb` (the mark
before the first step) is reported too.

The batch is 4 packed rows of 2048 tokens: the LLaVA-1.5 fine-tuning recipe's micro-batch
(recipes/llava15/finetune.yaml: `batch_size: 4`, `pack_tokens: 2048`; Mantis's is 2 x 8192).
Until the seventh session it was 2 x 1024, where the fixed costs (the process ~530 MB, fp32
weights, gradients and AdamW ~820 MB) are most of either peak and no checkpointing could
halve it; a training run sizes its micro-batch to fill the memory, which is the case
checkpointing is for.

The children run with glibc's mmap threshold fixed (`--mmap-threshold`, default 64 KiB:
`MALLOC_MMAP_THRESHOLD_`): every allocation above it is its own mapping, returned to the
system when freed, so the RSS follows the live tensors (tests/plan/test_plan_memory.py
checks `lmm plan`'s memory model against the same measure). glibc's default raises the
threshold as blocks are freed and keeps freed activations in its heap, which adds a varying
1-2.5 GB to both peaks here; `--mmap-threshold 0` measures that.

Checkpointing is what `FSDP2Config(activation_checkpointing=True)` applies
(`lmm.training.strategies.apply_activation_checkpointing`: every decoder layer recomputed in
the backward pass), called here directly because `apply_fsdp2` runs only under
`ModelParallelStrategy`. The model is the ~50M LLaVA of `train_throughput.py` (ViT 256 x 4,
Llama 640 x 10) by default. Step times (`step_s_ckpt`, `step_s_no_ckpt`, `step_ratio`) come
from separate children, `--time-runs` of each configuration alternating, under the allocator
the `lmm` command runs with (jemalloc when installed: `lmm.utils.allocator`); the fixed mmap
threshold of the measuring children page-faults every activation in and slows both steps
(their times: `step_s_*_measure_run`). The last line is one JSON object with `peak_mb_ckpt`
and `peak_mb_no_ckpt`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lmm.utils import allocator  # noqa: E402


def _throughput_module():
    """benchmarks/train_throughput.py (beside this file): model sizes, assets and the mix."""
    path = Path(__file__).with_name("train_throughput.py")
    spec = importlib.util.spec_from_file_location("_lmm_bench_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def status_mb(key: str) -> float:
    """A `Vm*` line of /proc/self/status (KiB) in MiB: `VmRSS` now, `VmHWM` its high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key} line")


def peak_mb() -> float:
    """This process's RSS high-water mark in MiB, `VmHWM`: the peak of this program's own
    memory. Not `ru_maxrss`: Linux carries it over fork + exec, so a child started by a large
    process (pytest after a suite, a benchmark holding a model) reports at least its parent's
    size."""
    return status_mb("VmHWM")


def child(config: dict) -> dict:
    """Build the model, take the stream's first batch, train `steps` steps; report memory."""
    from lmm.data.datamodule import ChatDataModule
    from lmm.data.templates import Llama3
    from lmm.training.strategies import apply_activation_checkpointing

    tt = _throughput_module()
    torch.set_num_threads(config["threads"])
    root = Path(config["root"])
    assets = {k: root / "assets" / k for k in ("tokenizer", "vision", "llm")}
    module = tt.build_module(assets, 1e-4, config["seed"])
    if config["checkpointing"]:
        apply_activation_checkpointing(module.model.llm.model)  # as FSDP2Config's
    data = ChatDataModule(
        template=Llama3(),
        train=str(root / "mix.json"),
        batch_size=config["rows"],
        pack_tokens=config["pack_tokens"],
        max_length=config["pack_tokens"],
        buffer_size=config["samples"],
        seed=config["seed"],
    )
    data.connect(module.tokenizer, module.media_spec(), module.image_token)
    batch = next(iter(data.train_stream()))
    optimizer = module.configure_optimizers()
    module.train()
    baseline = peak_mb()
    losses, times = [], []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config["bf16"]):
            loss, _ = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {
        "peak_mb": peak_mb(),
        "baseline_mb": baseline,
        "losses": losses,
        "step_s": times,
        "shape": list(batch.input_ids.shape),
        "tokens": batch.num_tokens,
        "params": sum(p.numel() for p in module.parameters()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "50m"], default="50m")
    p.add_argument("--rows", type=int, default=4, help="packed rows in the batch")
    p.add_argument("--pack-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=65536,
        help="MALLOC_MMAP_THRESHOLD_ of the children in bytes (0: glibc's dynamic default)",
    )
    p.add_argument(
        "--allocator",
        default="auto",
        help="host allocator of the step-time runs (LMM_ALLOCATOR: auto, jemalloc, tcmalloc, "
        "system)",
    )
    p.add_argument(
        "--time-runs",
        type=int,
        default=2,
        help="step-time runs per configuration, alternating (0: the measurement runs' times)",
    )
    p.add_argument("--samples", type=int, default=64, help="samples in the mix")
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"], default="bf16-mixed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)  # a JSON config: run one configuration
    a = p.parse_args(argv)
    if a.child:
        sys.stdout.write(json.dumps(child(json.loads(a.child))) + "\n")
        return {}
    tt = _throughput_module()
    start = time.perf_counter()
    results: dict[bool, dict] = {}
    timing: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tt.write_mix(root, a.samples, a.seed)
        tt.build_assets(root / "assets", a.size, a.seed)
        # peaks: under glibc with the fixed threshold; step times: again, each configuration
        # twice alternating, under the allocator the `lmm` command runs with (jemalloc when
        # installed), as a training run meets them
        name, path = allocator.choose(a.allocator)
        runs = [(False, "measure"), (True, "measure")]
        runs += [(ckpt, "time") for _ in range(a.time_runs) for ckpt in (False, True)]
        for ckpt, purpose in runs:
            config = {
                "root": str(root),
                "checkpointing": ckpt,
                "rows": a.rows,
                "pack_tokens": a.pack_tokens,
                "steps": a.steps,
                "samples": a.samples,
                "bf16": a.precision == "bf16-mixed",
                "threads": a.threads,
                "seed": a.seed,
            }
            env = {k: v for k, v in os.environ.items() if k != allocator.ACTIVE_ENV}
            if purpose == "time":
                if path:
                    env = allocator.environment(name, path, env)
            elif a.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
            run = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(config)],
                capture_output=True,
                text=True,
                env=env,
            )
            if run.returncode != 0:
                raise RuntimeError(f"child (checkpointing={ckpt}) failed:\n{run.stderr[-3000:]}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            if purpose == "time":
                timing[ckpt] += r["step_s"]
                print(
                    f"checkpointing {'on ' if ckpt else 'off'} ({name} allocator): step "
                    f"{min(r['step_s']):.2f}s"
                )
                continue
            results[ckpt] = r
            print(
                f"checkpointing {'on ' if ckpt else 'off'}: peak RSS {r['peak_mb']:.0f} MiB "
                f"(before the first step {r['baseline_mb']:.0f} MiB), batch {r['shape']} "
                f"({r['tokens']} tokens), step {min(r['step_s']):.2f}s, losses "
                + ", ".join(f"{x:.4f}" for x in r["losses"])
            )
    on, off = results[True], results[False]
    result = {
        "peak_mb_ckpt": round(on["peak_mb"], 1),
        "peak_mb_no_ckpt": round(off["peak_mb"], 1),
        "saved_mb": round(off["peak_mb"] - on["peak_mb"], 1),
        "baseline_mb_ckpt": round(on["baseline_mb"], 1),
        "baseline_mb_no_ckpt": round(off["baseline_mb"], 1),
        "training_mb_ckpt": round(on["peak_mb"] - on["baseline_mb"], 1),
        "training_mb_no_ckpt": round(off["peak_mb"] - off["baseline_mb"], 1),
        "step_s_ckpt": round(min(timing[True] or on["step_s"]), 3),
        "step_s_no_ckpt": round(min(timing[False] or off["step_s"]), 3),
        "step_ratio": round(
            min(timing[True] or on["step_s"]) / min(timing[False] or off["step_s"]), 3
        ),
        "step_allocator": name if timing[True] else "glibc, fixed mmap threshold",
        "step_s_ckpt_measure_run": round(min(on["step_s"]), 3),
        "step_s_no_ckpt_measure_run": round(min(off["step_s"]), 3),
        "max_loss_diff": max(abs(x - y) for x, y in zip(on["losses"], off["losses"], strict=True)),
        "measure": "RSS high-water mark of a child process per configuration (VmHWM)",
        "mmap_threshold": a.mmap_threshold or "glibc default",
        "model": a.size,
        "params": on["params"],
        "batch_shape": on["shape"],
        "batch_tokens": on["tokens"],
        "steps": a.steps,
        "precision": a.precision,
        "threads": a.threads,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
