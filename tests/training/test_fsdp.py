"""FSDP2 on CPU (gloo): 2 processes, and 2 nodes on localhost, equal one process on the global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _job_args(
    assets: Path, data: Path, out: Path, steps: int, batch_size: int, extra: list[str] = ()
) -> list[str]:
    return [
        "-m",
        "tests.training.fsdp_job",
        str(assets),
        str(data),
        str(out),
        f"--steps={steps}",
        f"--batch-size={batch_size}",
        *extra,
    ]


def _single(assets, data, out, steps, batch_size, extra=()):
    cmd = [sys.executable, *_job_args(assets, data, out, steps, batch_size, list(extra))]
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _torchrun(assets, data, out, steps, batch_size, nnodes: int, nproc: int, extra=(), ok=True):
    """Run the job under torchrun; its output (every node's log), which must end in success
    (`ok`) or in failure."""
    port = _free_port()
    procs, logs = [], []
    out.mkdir(parents=True, exist_ok=True)
    for node in range(nnodes):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            *_job_args(assets, data, out, steps, batch_size, list(extra)),
        ]
        # Output goes to files, not pipes: an unread pipe fills up and blocks that node, and
        # the other node then waits for it at the exit barrier.
        logs.append((out / f"node{node}.log").open("w"))
        procs.append(
            subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT)
        )
    output = []
    for p, log in zip(procs, logs, strict=True):
        p.wait(timeout=600)
        log.close()
        output.append(Path(log.name).read_text())
        assert (p.returncode == 0) == ok, output[-1][-4000:]
    return "\n".join(output)


def _losses(out: Path) -> list[float]:
    rows = [r.split() for r in (out / "losses.txt").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    return [float.fromhex(r[1]) for r in rows]


@pytest.fixture(scope="module")
def data(synthetic_data, tmp_path_factory) -> Path:
    """Train records in file order; in the first global batch of 4, rank 1's two are text-only."""
    records = json.loads((synthetic_data / "train.json").read_text())[:14]
    text = [
        {
            "id": f"text-{i}",
            "conversation": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for i, (q, a) in enumerate([("Say red.", "red"), ("Say blue.", "blue")])
    ]
    ordered = [records[0], text[0], records[1], text[1], *records[2:]]
    out = tmp_path_factory.mktemp("fsdp_data")
    # a copy: a symlink out of the data root is refused (lmm.data.formats._resolve)
    shutil.copytree(synthetic_data / "images", out / "images")
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
    return out


def _compare(reference: Path, sharded: Path):
    expected, got = _losses(reference), _losses(sharded)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    a = torch.load(reference / "final.pt", weights_only=True)
    b = torch.load(sharded / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.slow
def test_fsdp2_matches_single_process(tiny_assets, data, tmp_path):
    assets = Path(tiny_assets["llm"]).parent
    _single(assets, data, tmp_path / "one", steps=4, batch_size=4)
    _torchrun(assets, data, tmp_path / "two", steps=4, batch_size=2, nnodes=1, nproc=2)
    _compare(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_fsdp2_meta_init(tiny_assets, data, tmp_path):
    """Rank 1 builds on the meta device (no weights held) and gets rank 0's by broadcast after
    sharding: the same losses and final weights as one process."""
    assets = Path(tiny_assets["llm"]).parent
    _single(assets, data, tmp_path / "one", steps=3, batch_size=4)
    run = tmp_path / "meta"
    _torchrun(assets, data, run, 3, 2, nnodes=1, nproc=2, extra=["--meta-init"])
    meta0, total0 = map(int, (run / "meta_rank0.txt").read_text().split())
    meta1, total1 = map(int, (run / "meta_rank1.txt").read_text().split())
    assert meta0 == 0 and meta1 == total1 == total0 > 0
    _compare(tmp_path / "one", run)


@pytest.mark.slow
def test_two_nodes_localhost(tiny_assets, data, tmp_path):
    assets = Path(tiny_assets["llm"]).parent
    _single(assets, data, tmp_path / "one", steps=3, batch_size=4)
    _torchrun(assets, data, tmp_path / "nodes", steps=3, batch_size=2, nnodes=2, nproc=1)
    _compare(tmp_path / "one", tmp_path / "nodes")


@pytest.fixture(scope="module")
def stopped(tiny_assets, data, tmp_path_factory) -> Path:
    """A 2-rank run stopped after step 3, with its sharded checkpoint `ckpt/epoch=0-step=3.ckpt`."""
    run = tmp_path_factory.mktemp("stopped")
    assets = Path(tiny_assets["llm"]).parent
    _torchrun(assets, data, run, 3, 2, nnodes=1, nproc=2, extra=["--ckpt-every=3"])
    return run


@pytest.mark.slow
def test_fsdp2_sharded_resume(tiny_assets, data, stopped, tmp_path):
    """2 ranks: stopped after step 3 with a sharded checkpoint, resumed → the same steps 4-6."""
    assets = Path(tiny_assets["llm"]).parent
    _torchrun(assets, data, tmp_path / "full", steps=6, batch_size=2, nnodes=1, nproc=2)
    run = tmp_path / "resumed"
    shutil.copytree(stopped, run)
    ckpt = run / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.is_dir(), "FSDP2 should write a sharded checkpoint folder"
    assert len(list(ckpt.glob("*.distcp"))) == 2, "one shard file per rank"
    manifest = json.loads((ckpt / "lmm_hashes.json").read_text())["files"]
    assert sorted(manifest) == sorted(p.name for p in ckpt.iterdir() if p.name != "lmm_hashes.json")
    _torchrun(assets, data, run, 6, 2, nnodes=1, nproc=2, extra=[f"--resume={ckpt}"])
    full, resumed = _losses(tmp_path / "full"), _losses(run)
    assert [x.hex() for x in resumed] == [x.hex() for x in full]  # bit-identical, steps 1-6
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(run / "final.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_fsdp2_resume_refuses_a_damaged_shard(tiny_assets, data, stopped, tmp_path):
    """2 ranks: a sharded checkpoint with a flipped byte in rank 1's shard, or without rank 0's
    shard, stops the resume on both ranks with the folder's manifest error naming the file."""
    assets = Path(tiny_assets["llm"]).parent
    ckpt = stopped / "ckpt" / "epoch=0-step=3.ckpt"
    flipped, missing = tmp_path / "flipped.ckpt", tmp_path / "missing.ckpt"
    shutil.copytree(ckpt, flipped)
    shard = flipped / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    shutil.copytree(ckpt, missing)
    (missing / "__0_0.distcp").unlink()
    for folder, expected in (
        (flipped, "CheckpointIntegrityError: checkpoint {}: file '__1_0.distcp' differs"),
        (missing, "CheckpointError: checkpoint {}: file '__0_0.distcp' is missing"),
    ):
        out = tmp_path / f"resume-{folder.stem}"
        log = _torchrun(
            assets, data, out, 6, 2, nnodes=1, nproc=2, extra=[f"--resume={folder}"], ok=False
        )
        assert log.count(expected.format(folder)) >= 2, log[-4000:]  # both ranks stop
        assert not (out / "losses.txt").exists()  # no step was taken


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["--lora", "--qlora"])
def test_fsdp2_lora_adapter(tiny_assets, data, tmp_path, kind):
    """LoRA, and QLoRA on a 4-bit nf4 LLM (fp32 compute), under FSDP2 (2 ranks): the losses of
    1 process, and the saved adapter is the same."""
    from safetensors.torch import load_file

    assets = Path(tiny_assets["llm"]).parent
    _single(assets, data, tmp_path / "one", steps=3, batch_size=4, extra=[kind])
    _torchrun(assets, data, tmp_path / "two", 3, 2, nnodes=1, nproc=2, extra=[kind])
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "two")),
        torch.tensor(_losses(tmp_path / "one")),
        rtol=1e-5,
        atol=1e-6,
    )
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        a = load_file(tmp_path / "one" / "adapter" / name)
        b = load_file(tmp_path / "two" / "adapter" / name)
        assert a.keys() == b.keys() and a, name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    trained = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())


@pytest.mark.slow
def test_init_from_a_sharded_checkpoint(tiny_assets, stopped):
    """A later stage's `init_from` takes a sharded (FSDP2) stage's folder in one process: its
    weights, whole, equal the 2-rank run's own full weights at that step."""
    from lmm.training.checkpoint import init_from_checkpoint, sharded_weights
    from tests.helpers import tiny_llava

    ckpt = stopped / "ckpt" / "epoch=0-step=3.ckpt"
    final = torch.load(stopped / "final.pt", weights_only=True)  # after step 3, unsharded
    weights = sharded_weights(ckpt)
    assert weights.keys() == final.keys()
    for k in final:
        assert torch.equal(weights[k], final[k]), k
    module = tiny_llava(tiny_assets)
    taken = init_from_checkpoint(module, ckpt, [r"model\.connector\..*"])
    assert taken and all(k.startswith("model.connector.") for k in taken)
    own = module.state_dict()
    assert all(torch.equal(own[k], final[k]) for k in taken)
