"""Checkpoint integrity: a flipped byte, a truncated or an empty file is a named error on every
load path (`--ckpt_path` a file or `last`, `init_from`, `lmm.load`, `lmm convert export --ckpt`,
an imported folder's weights, a LoRA adapter); a non-finite loss stops training."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lmm
from lmm.cli import main
from lmm.convert import import_checkpoint as import_layout
from lmm.convert import load_imported
from lmm.families.llava.convert import export_hf, import_checkpoint
from lmm.training.callbacks import NonFiniteLoss
from lmm.training.checkpoint import (
    CheckpointError,
    CheckpointIntegrityError,
    load_checkpoint_file,
    verify_manifest,
    write_manifest,
)
from lmm.training.lora import (
    ADAPTER_FILE,
    TRAINABLES_FILE,
    LoraConfig,
    load_adapter,
    save_adapter,
)
from tests.builders import build_tiny_idefics2
from tests.evaluation.test_runner import TINY, _model_args
from tests.helpers import quiet_trainer, tiny_data, tiny_llava

TEMPLATE = "lmm.data.templates.Llama3"


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
    # a recipe's init_from through the CLI (jsonargparse would wrap the error)
    with pytest.raises(CheckpointError, match=name + EXPECTED[kind]):
        main(["validate", *args, f"--model.init_args.init_from={path}"])
    # lmm convert export --ckpt (lmm.convert.export → load_weights)
    recipe = ckpt.parents[1] / "config.yaml"
    out = path.parent / f"export-{kind}"
    with pytest.raises(CheckpointError, match=name + EXPECTED[kind]):
        main(["convert", "export", "--config", str(recipe), "--ckpt", str(path), "--out", str(out)])
    assert not out.exists()


def _resolved_last(run, broken, tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    """A copy of the run's folder whose `checkpoints/last.ckpt` is the `kind` copy, and the
    arguments that make `--ckpt_path last` resolve there (the run's logger version)."""
    ckpt, args = run
    root = tmp_path / "run"
    shutil.copytree(ckpt.parents[1], root / ckpt.parents[1].name)
    last = root / ckpt.parents[1].name / "checkpoints" / "last.ckpt"
    shutil.copyfile(broken[kind] if kind != "intact" else ckpt, last)
    moved = [a.replace(str(ckpt.parents[2]), str(root)) for a in args]
    version = ckpt.parents[1].name.removeprefix("version_")
    return last, [*moved, f"--trainer.logger.init_args.version={version}", "--ckpt_path=last"]


def test_ckpt_path_last_with_a_flipped_byte(run, broken, tmp_path):
    """`--ckpt_path last` is left to Lightning (it resolves the ModelCheckpoint's last.ckpt);
    CheckpointHashes checks the file it loaded: the named error, not a silent load."""
    last, args = _resolved_last(run, broken, tmp_path, "weight")
    with pytest.raises(CheckpointIntegrityError, match=rf"{last}.*{EXPECTED['weight']}"):
        main(["validate", *args])


@pytest.mark.parametrize("kind", ["truncated", "empty"])
def test_ckpt_path_last_truncated_or_empty(run, broken, tmp_path, kind):
    """The CLI's trainer reads checkpoints through `AtomicCheckpointIO` (`load_checkpoint_file`):
    a cut or empty last.ckpt is lmm's named error too, not torch's."""
    last, args = _resolved_last(run, broken, tmp_path, kind)
    with pytest.raises(CheckpointError, match=rf"checkpoint {last}.*{EXPECTED[kind]}"):
        main(["validate", *args])


def test_ckpt_path_last_intact_loads(run, broken, tmp_path):
    last, args = _resolved_last(run, broken, tmp_path, "intact")
    main(["validate", *args])  # resolved to last.ckpt (above: the same path fails when flipped)


def test_ckpt_path_last_checked_by_the_callback(tiny_assets, synthetic_data, tmp_path):
    """A Trainer of lmm's module with Lightning's own checkpoint IO (Python, no CLI): `last`
    resolves to the ModelCheckpoint's last.ckpt, Lightning loads it, and CheckpointHashes
    raises the named error for the flipped weight (not swallowed, before any step)."""
    dirpath = tmp_path / "ckpt"

    def fit(ckpt_path: str | None) -> None:
        torch.manual_seed(0)
        module = tiny_llava(tiny_assets)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[ModelCheckpoint(dirpath, save_last=True)],
            default_root_dir=tmp_path,
        )
        dm = tiny_data(synthetic_data, module, batch_size=2)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    fit(None)
    last = dirpath / "last.ckpt"
    data = last.read_bytes()
    weight = torch.load(last, weights_only=True)["state_dict"]["model.connector.linear_1.weight"]
    last.write_bytes(_flip(data, _tensor_offset(data, weight)))
    with pytest.raises(
        CheckpointIntegrityError, match=rf"checkpoint {last}: entry {EXPECTED['weight']}"
    ):
        fit("last")


def test_resume_from_intact_checkpoint_through_the_cli(run):
    ckpt, args = run
    main(["validate", *args, f"--ckpt_path={ckpt}"])  # no error: the hashes match


# --- sharded (FSDP2) checkpoint folders: the manifest (resume: tests/training/test_fsdp.py) ---

SHARDED_EXPECTED = {
    "flipped": (CheckpointIntegrityError, r"file '__1_0\.distcp' differs from the hash written"),
    "truncated": (CheckpointError, r"file '__1_0\.distcp' has 512 bytes, 1024 were written"),
    "missing": (CheckpointError, r"file '__1_0\.distcp' is missing"),
}


def _sharded_folder(folder: Path) -> Path:
    """A folder laid out as torch.distributed.checkpoint writes one for 2 ranks, its manifest
    written."""
    folder.mkdir()
    torch.manual_seed(0)
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"):
        (folder / name).write_bytes(torch.randint(0, 256, (1024,), dtype=torch.uint8).numpy())
    write_manifest(folder)
    return folder


def test_sharded_manifest_lists_every_file(tmp_path):
    folder = _sharded_folder(tmp_path / "epoch=0-step=2.ckpt")
    files = json.loads((folder / "lmm_hashes.json").read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert all(entry["size"] == 1024 for entry in files.values())
    verify_manifest(folder)  # intact
    (folder / "lmm_hashes.json").unlink()
    verify_manifest(folder)  # a folder without a manifest (another tool's) is not refused


@pytest.mark.parametrize("kind", list(SHARDED_EXPECTED))
def test_sharded_folder_damaged(run, tmp_path, kind):
    _, args = run
    folder = _sharded_folder(tmp_path / "epoch=0-step=2.ckpt")
    shard = folder / "__1_0.distcp"
    if kind == "flipped":
        shard.write_bytes(_flip(shard.read_bytes(), 700))
    elif kind == "truncated":
        shard.write_bytes(shard.read_bytes()[:512])
    else:
        shard.unlink()
    error, expected = SHARDED_EXPECTED[kind]
    with pytest.raises(error, match=rf"checkpoint {folder}: {expected}"):
        verify_manifest(folder)
    # the CLI's --ckpt_path checks a folder before Lightning (FSDP2Strategy checks it again)
    with pytest.raises(error, match=rf"checkpoint {folder}: {expected}"):
        main(["validate", *args, f"--ckpt_path={folder}"])


# --- safetensors lmm writes: imported weights, LoRA adapters ---------------------------------


def _flip_tensor(path: Path, name: str) -> None:
    """Flip one bit in the middle of tensor `name`'s bytes in a safetensors file."""
    data = path.read_bytes()
    path.write_bytes(_flip(data, _tensor_offset(data, load_file(path)[name])))


def _damage(path: Path, kind: str, tensor: str) -> None:
    if kind == "flipped":
        _flip_tensor(path, tensor)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"")


SAFETENSORS_EXPECTED = {
    "flipped": "tensor '{tensor}' differs from the hash written with it",
    "truncated": r"\(\d+ bytes\) cannot be read \(SafetensorError.*truncated",
    "empty": r"is empty \(0 bytes\)",
}


@pytest.fixture(scope="module")
def imported(tiny_assets, tmp_path_factory) -> Path:
    """`lmm convert import --layout mantis` of the tiny LLaVA (exported to transformers first):
    a folder with `weights.safetensors` (the connector) and `lmm.yaml`."""
    root = tmp_path_factory.mktemp("imported")
    torch.manual_seed(0)
    hf = export_hf(tiny_llava(tiny_assets), root / "hf")
    import_checkpoint(hf, root / "out", "mantis")
    return root / "out"


def _copy_import(imported: Path, dest: Path) -> Path:
    """A copy of an import folder whose lmm.yaml names its own files."""
    shutil.copytree(imported, dest)
    recipe = dest / "lmm.yaml"
    recipe.write_text(recipe.read_text().replace(str(imported.resolve()), str(dest.resolve())))
    return dest


def test_imported_weights_carry_hashes(imported):
    weights = imported / "weights.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        header = f.metadata()
        names = list(f.keys())
    stored = json.loads(header["lmm_hashes"])
    assert stored["algorithm"] == "blake2b-128" and header["format"] == "pt"
    assert sorted(stored["entries"]) == sorted(names) and "model.connector.linear_1.weight" in names
    # a tensor hashes the same in a .safetensors and in a .ckpt
    ckpt = weights.parent / "as.ckpt"
    torch.save({"state_dict": load_file(weights)}, ckpt)
    from lmm.training.checkpoint import add_hashes

    entries = add_hashes(torch.load(ckpt, weights_only=True))["lmm_hashes"]["entries"]
    assert {k.removeprefix("state_dict/"): v for k, v in entries.items()} == stored["entries"]


@pytest.mark.parametrize("kind", list(SAFETENSORS_EXPECTED))
def test_imported_weights_damaged(imported, tmp_path, kind):
    folder = _copy_import(imported, tmp_path / "out")
    weights = folder / "weights.safetensors"
    tensor = "model.connector.linear_1.weight"
    _damage(weights, kind, tensor)
    expected = rf"checkpoint {weights}.*" + SAFETENSORS_EXPECTED[kind].format(
        tensor=tensor.replace(".", r"\.")
    )
    error = CheckpointIntegrityError if kind == "flipped" else CheckpointError
    with pytest.raises(error, match=expected):  # lmm.load of the folder
        lmm.load(folder, template=TEMPLATE)
    with pytest.raises(error, match=expected):  # its lmm.yaml's init_from
        load_imported(folder)


def test_imported_weights_without_hashes_still_load(imported, tmp_path):
    """A safetensors file from elsewhere (no lmm_hashes in its header) loads as before."""
    folder = _copy_import(imported, tmp_path / "out")
    weights = folder / "weights.safetensors"
    tensors = load_file(weights)
    save_file(tensors, weights, {"format": "pt"})  # as transformers or the hub write them
    module = lmm.load(folder, template=TEMPLATE).module
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
    assert load_checkpoint_file(weights)["state_dict"].keys() == tensors.keys()


def test_imported_vision_tensors_damaged(tiny_assets, tmp_path):
    """Idefics2's import writes `vision/model.safetensors`, read by `checkpoint_tensors` a
    prefix at a time: each tensor read is checked against its hash."""
    hf = build_tiny_idefics2(tmp_path / "hf", tiny_assets["tokenizer"])
    import_layout("idefics2", hf, tmp_path / "out")
    weights = tmp_path / "out" / "vision" / "model.safetensors"
    tensor = "model.vision_model.embeddings.patch_embedding.weight"
    _flip_tensor(weights, tensor)
    expected = rf"checkpoint {weights}: tensor '{re.escape(tensor)}' differs"
    with pytest.raises(CheckpointIntegrityError, match=expected):
        lmm.load(tmp_path / "out", template="lmm.data.templates.Idefics2")


@pytest.fixture(scope="module")
def adapter(tiny_assets, tmp_path_factory) -> Path:
    """An adapter folder of the tiny LLaVA (LoRA r 2 on the LLM, the connector trained)."""
    torch.manual_seed(0)
    module = tiny_llava(tiny_assets, lora=LoraConfig(r=2, alpha=4))
    return save_adapter(module, tmp_path_factory.mktemp("adapter") / "adapter")


ADAPTER_TENSORS = {
    ADAPTER_FILE: "llm.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    TRAINABLES_FILE: "connector.linear_1.weight",
}


@pytest.mark.parametrize("file", list(ADAPTER_TENSORS))
@pytest.mark.parametrize("kind", list(SAFETENSORS_EXPECTED))
def test_lora_adapter_damaged(adapter, tiny_assets, tmp_path, file, kind):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    tensor = ADAPTER_TENSORS[file]
    _damage(folder / file, kind, tensor)
    fresh = tiny_llava(tiny_assets)
    expected = rf"checkpoint {folder / file}.*" + SAFETENSORS_EXPECTED[kind].format(
        tensor=tensor.replace(".", r"\.")
    )
    error = CheckpointIntegrityError if kind == "flipped" else CheckpointError
    with pytest.raises(error, match=expected):
        load_adapter(fresh, folder)


def test_lora_adapter_intact_loads(adapter, tiny_assets):
    fresh = tiny_llava(tiny_assets)
    load_adapter(fresh, adapter)  # hashes match
    saved = load_file(adapter / TRAINABLES_FILE)["connector.linear_1.weight"]
    assert torch.equal(fresh.model.connector.linear_1.weight, saved)


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
