"""Host memory of FSDP2 ranks while loading and training: `fsdp.meta_init` vs every rank loading.

Two ranks on this machine (`torchrun --nproc-per-node 2`, gloo), each building the same LLaVA
(`train_throughput.py`'s configs, ~50M by default; its checkpoints stored in bf16, as published
ones are, and loaded as float32 parameters, as lmm trains them) and training `--steps` steps on
packed rows of the length mix under `FSDP2Strategy`. (A checkpoint already in the parameters'
dtype is memory-mapped by transformers and costs a rank little until it is touched; the
conversion makes each loading rank hold its own full copy.) Baseline: every rank loads the full weights before
`fully_shard` keeps its shard. lmm: `FSDP2Config(meta_init=True)` — rank 1 builds on the meta
device and receives its shard of rank 0's weights. Memory is each rank's RSS high-water mark
(`ru_maxrss`) after building, and after training; the losses of both runs must be equal.
The last line is one JSON object (`peak_mb_rank1_meta_init`, `peak_mb_rank1_full_load`, ...).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_throughput.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _memory():
    """benchmarks/memory.py (beside this file): `peak_mb`, and its `_throughput_module` (model
    sizes, assets and the mix of train_throughput.py)."""
    path = Path(__file__).with_name("memory.py")
    spec = importlib.util.spec_from_file_location("_lmm_bench_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_bf16(folder: Path) -> None:
    """Store every float tensor of the safetensors files below `folder` in bf16."""
    from safetensors.torch import load_file, save_file

    for file in folder.rglob("*.safetensors"):
        state = load_file(file)
        state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, file, metadata={"format": "pt"})


def rank_job(config: dict) -> None:
    """One rank (under torchrun): build (on meta or not), train, write its figures."""
    import lightning as L
    import torch
    import torch.distributed as dist

    from lmm.components.pretrained import empty_init
    from lmm.training.strategies import FSDP2Config, FSDP2Strategy

    torch.set_num_threads(1)
    memory = _memory()
    tt = memory._throughput_module()
    root, rank = Path(config["root"]), int(os.environ["RANK"])
    assets = {k: root / "assets" / k for k in ("tokenizer", "vision", "llm")}
    with empty_init(config["meta_init"]):
        module = tt.build_module(assets, 1e-4, config["seed"])
    module.fsdp = FSDP2Config(meta_init=config["meta_init"])
    built = memory.peak_mb()
    a = argparse.Namespace(samples=config["samples"], seed=config["seed"])
    data = tt.packed_data(root / "mix.json", 1, config["pack_tokens"], a)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"].detach().clone()
            dist.all_reduce(loss)
            losses.append(float(loss) / trainer.world_size)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        strategy=FSDP2Strategy(),
        precision="bf16-mixed",
        max_steps=config["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Record()],
    )
    trainer.fit(module, datamodule=data)
    out = {"rank": rank, "built_mb": built, "peak_mb": memory.peak_mb(), "losses": losses}
    (root / f"{config['name']}_rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/training/fsdp_job.py: gloo threads at interpreter exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, name: str, meta_init: bool, a: argparse.Namespace) -> list[dict]:
    """Both ranks of one configuration; their figures, rank 0 first."""
    config = {
        "root": str(root),
        "name": name,
        "meta_init": meta_init,
        "steps": a.steps,
        "samples": a.samples,
        "pack_tokens": a.pack_tokens,
        "seed": a.seed,
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        __file__,
        "--rank-job",
        json.dumps(config),
    ]
    log = root / f"{name}.log"
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{log.read_text()[-4000:]}")
    return [json.loads((root / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "50m"], default="50m")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--samples", type=int, default=64, help="samples in the mix")
    p.add_argument("--pack-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank-job", help=argparse.SUPPRESS)  # a JSON config: one rank's work
    a = p.parse_args(argv)
    if a.rank_job:
        rank_job(json.loads(a.rank_job))
        return {}
    tt = _memory()._throughput_module()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tt.write_mix(root, a.samples, a.seed)
        tt.build_assets(root / "assets", a.size, a.seed)
        to_bf16(root / "assets")
        weights_mb = sum(f.stat().st_size for f in (root / "assets").rglob("*.safetensors"))
        full = run(root, "full_load", False, a)
        meta = run(root, "meta_init", True, a)
    for name, ranks in (("every rank loads", full), ("meta_init", meta)):
        print(
            f"{name}: "
            + "; ".join(
                f"rank {r['rank']} built {r['built_mb']:.0f} MiB, peak {r['peak_mb']:.0f} MiB"
                for r in ranks
            )
            + ", losses "
            + ", ".join(f"{x:.4f}" for x in ranks[0]["losses"])
        )
    diff = max(abs(x - y) for x, y in zip(full[0]["losses"], meta[0]["losses"], strict=True))
    result = {
        "peak_mb_rank1_meta_init": round(meta[1]["peak_mb"], 1),
        "peak_mb_rank1_full_load": round(full[1]["peak_mb"], 1),
        "built_mb_rank1_meta_init": round(meta[1]["built_mb"], 1),
        "built_mb_rank1_full_load": round(full[1]["built_mb"], 1),
        "peak_mb_rank0_meta_init": round(meta[0]["peak_mb"], 1),
        "peak_mb_rank0_full_load": round(full[0]["peak_mb"], 1),
        "weights_mb_on_disk": round(weights_mb / 2**20, 1),
        "max_loss_diff": diff,
        "measure": "RSS high-water mark of each rank (ru_maxrss), after building and at the end",
        "model": a.size,
        "steps": a.steps,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
