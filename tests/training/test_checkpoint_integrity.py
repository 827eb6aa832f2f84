"""Checkpoint integrity: a flipped byte, a truncated or an empty file is a named error on every
load path (`--ckpt_path`, `init_from`, `lmm.load`); a non-finite loss stops training."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import lmm
from lmm.cli import main
from lmm.training.callbacks import NonFiniteLoss
from lmm.training.checkpoint import CheckpointError, CheckpointIntegrityError
from tests.evaluation.test_runner import TINY, _model_args
from tests.helpers import quiet_trainer, tiny_data, tiny_llava


def _fit_args(tiny_assets, synthetic_data, out: Path) -> list[str]:
    return [
        f"--config={TINY}",
        *_model_args(tiny_assets),
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--data.init_args.train={synthetic_data / 'train.json'}",
        f"--data.init_args.val={synthetic_data / 'val.json'}",
        f"--data.init_args.test={synthetic_data / 'test.json'}",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=4",
    ]


@pytest.fixture(scope="module")
def run(tiny_assets, synthetic_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """A checkpoint of `lmm fit` (2 steps of the tiny recipe), and the arguments that made it."""
    out = tmp_path_factory.mktemp("run")
    args = _fit_args(tiny_assets, synthetic_data, out)
    main(["fit", *args, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    [ckpt] = list(out.rglob("last.ckpt"))  # beside the step-2 checkpoint of the validation
    return ckpt, args


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _tensor_offset(data: bytes, tensor: torch.Tensor) -> int:
    """Where a tensor's bytes are in the file (the middle of them)."""
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0, "tensor bytes not found once in the file"
    return at + len(raw) // 2


def _pickle_offset(path: Path) -> int:
    """An offset inside the pickle (`archive/data.pkl`), in one of its plain values."""
    with zipfile.ZipFile(path) as archive:
        [info] = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
        pickled = archive.read(info)
    data = path.read_bytes()
    start = data.find(pickled)
    assert start > 0
    return start + pickled.find(b"pytorch-lightning_version")  # a key: still unpickles


@pytest.fixture(scope="module")
def broken(run, tmp_path_factory) -> dict[str, Path]:
    """Copies of the checkpoint: a flipped byte in a weight, in the optimizer state and in the
    pickle; cut in half; empty. Each beside the run's config.yaml (for `lmm.load`)."""
    ckpt, _ = run
    data = ckpt.read_bytes()
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    weight = loaded["state_dict"]["model.connector.linear_1.weight"]
    [exp_avg] = [
        s["exp_avg"] for s in loaded["optimizer_states"][0]["state"].values() if s["exp_avg"].any()
    ][:1]
    files = {
        "weight": _flip(data, _tensor_offset(data, weight)),
        "optimizer": _flip(data, _tensor_offset(data, exp_avg)),
        "pickle": _flip(data, _pickle_offset(ckpt)),
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }
    out = {}
    for kind, content in files.items():
        path = ckpt.parent / f"{kind}.ckpt"
        path.write_bytes(content)
        out[kind] = path
    return out


EXPECTED = {
    "weight": r"'state_dict/model\.connector\.linear_1\.weight' differs",
    "optimizer": r"'optimizer_states/0/state/\d+/exp_avg' differs",
    "pickle": r"data\.pkl|CRC",
    "truncated": r"\(\d+ bytes\) cannot be read.*truncated",
    "empty": r"is empty \(0 bytes\)",
}


def test_intact_checkpoint_has_hashes_and_loads(run):
    ckpt, _ = run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    entries = checkpoint["lmm_hashes"]["entries"]
    assert "state_dict/model.connector.linear_1.weight" in entries
    assert any(k.startswith("optimizer_states/0/state/") for k in entries)
    assert any(k.startswith("lmm_rng/") for k in entries)  # RngState's entries are covered
    lmm.load(ckpt)  # verifies without error


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_checkpoint_bit_flip_detected(run, broken, tiny_assets, kind):
    ckpt, args = run
    path = broken[kind]
    name = rf"checkpoint {path}.*" if kind != "weight" else rf"{path}.*"
    # lmm.load (lmm.training.recipe.load_weights)
    with pytest.raises(CheckpointError, match=name + EXPECTED[kind]) as err:
        lmm.load(path)
    assert "weights_only=False" not in str(err.value)
    if kind in ("weight", "optimizer"):
        assert isinstance(err.value, CheckpointIntegrityError)
    # init_from (lmm.training.checkpoint.init_from_checkpoint)
    with pytest.raises(CheckpointError, match=name + EXPECTED[kind]):
        tiny_llava(tiny_assets, init_from=str(path))
    # the CLI's --ckpt_path, before Lightning's own load
    with pytest.raises(CheckpointError, match=name + EXPECTED[kind]):
        main(["validate", *args, f"--ckpt_path={path}"])


def test_resume_from_intact_checkpoint_through_the_cli(run):
    ckpt, args = run
    main(["validate", *args, f"--ckpt_path={ckpt}"])  # no error: the hashes match


def test_nan_loss_stops_training_naming_the_records(tiny_assets, synthetic_data, tmp_path):
    torch.manual_seed(0)
    module = tiny_llava(tiny_assets)
    dm = tiny_data(synthetic_data, module, batch_size=2)
    module.training_step = lambda batch, batch_idx: module.loss(batch)[0] * float("nan")
    seen: list[list[str]] = []
    original = NonFiniteLoss.on_train_batch_start

    def spy(self, trainer, pl_module, batch, batch_idx):
        seen.append(list(batch.ids))
        original(self, trainer, pl_module, batch, batch_idx)

    before = {k: v.clone() for k, v in module.state_dict().items()}
    NonFiniteLoss.on_train_batch_start = spy
    try:
        with pytest.raises(FloatingPointError, match=r"loss is nan at step 0") as err:
            quiet_trainer(tmp_path, max_steps=2, callbacks=[]).fit(module, datamodule=dm)
    finally:
        NonFiniteLoss.on_train_batch_start = original
    assert len(seen) == 1 and len(seen[0]) == 2
    assert f"records {seen[0]}" in str(err.value)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step was taken


def test_nan_loss_check_can_be_switched_off(tiny_assets, synthetic_data, tmp_path):
    module = tiny_llava(tiny_assets)
    dm = tiny_data(synthetic_data, module, batch_size=2)
    module.training_step = lambda batch, batch_idx: module.loss(batch)[0] * float("nan")
    off = NonFiniteLoss(enabled=False)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[off])
    trainer.fit(module, datamodule=dm)  # the recipe's own NonFiniteLoss is used: no error
    assert trainer.global_step == 1
    assert [c for c in trainer.callbacks if isinstance(c, NonFiniteLoss)] == [off]
