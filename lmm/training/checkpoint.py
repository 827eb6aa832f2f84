"""Checkpoints: atomic writes, content hashes, clear errors for bad files, stage init.

`AtomicCheckpointIO` writes to a temporary file in the same folder and renames it over the
target, so a process killed mid-write leaves the previous checkpoint intact. Every checkpoint
carries a hash of each tensor and value it holds (`lmm_hashes`, written by `add_hashes`: the
`CheckpointHashes` callback and `AtomicCheckpointIO`); `load_checkpoint_file`, which every load
path uses, checks them. Loading always uses `torch.load(weights_only=True)`; an empty,
truncated, corrupt or altered file raises `CheckpointError` naming the file (and the first
entry that differs).

The safetensors files lmm writes (imports, LoRA adapters) carry the same per-tensor hashes in
their header's metadata (`save_safetensors`; `load_safetensors` checks them). A sharded
(FSDP2, `torch.distributed.checkpoint`) checkpoint folder carries a manifest,
`lmm_hashes.json`, with the size and hash of every file in it (`write_manifest`;
`verify_manifest` checks it).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from lmm.utils.errors import UserError
from lmm.utils.logging import get_logger

log = get_logger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read, or whose content is not what was written."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint whose tensors or values differ from the hashes written with it."""


HASHES = "lmm_hashes"
MANIFEST = "lmm_hashes.json"  # in a sharded checkpoint folder: size and hash of every file
_ALGORITHM = "blake2b-128"
_FIX = "the file was damaged after it was written (disk, copy, transfer): resume from an earlier "
_FIX += "checkpoint or copy it again"
_FIX_WRITTEN = "the file was damaged after it was written (disk, copy, transfer): write it again "
_FIX_WRITTEN += "(lmm convert import, save_adapter) or copy it again"
# files (and sharded folders) whose hashes matched, by (path, size, mtime): a run that checked
# a checkpoint before Lightning loads it does not hash it twice
_verified: set[tuple] = set()


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(`a/b/0/c`, value) for every tensor and plain value inside dicts, lists and tuples."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if path == "" and key == HASHES:
                continue
            yield from _leaves(value, f"{path}/{key}" if path else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}/{i}")
    else:
        yield path, obj


def _digest(value: Any) -> str | None:
    """Hash of a tensor's dtype, shape and bytes, or of a plain value's type and repr; None for
    what cannot be hashed here (sharded DTensors, meta tensors)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and not isinstance(value, nn.Parameter):
            return None  # DTensor and other subclasses: their bytes are on other ranks
        if value.is_meta:
            return None
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif value is None or isinstance(value, bool | int | float | str | bytes):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    else:
        h.update(type(value).__qualname__.encode())  # repr may hold an address
    return h.hexdigest()


def add_hashes(checkpoint: dict) -> dict:
    """Write `checkpoint["lmm_hashes"]`: the hash of every tensor and plain value in it."""
    hashes = {}
    for path, value in _leaves(checkpoint):
        digest = _digest(value)
        if digest is not None:
            hashes[path] = digest
    checkpoint[HASHES] = {"algorithm": _ALGORITHM, "entries": hashes}
    return checkpoint


def verify_hashes(checkpoint: dict, path: str | Path) -> None:
    """Check `checkpoint` against its `lmm_hashes`; `CheckpointIntegrityError` names the first
    entry that differs. A checkpoint without hashes (another tool's, or older) is logged."""
    stored = checkpoint.get(HASHES)
    if stored is None:
        log.warning("checkpoint %s has no %s: its content cannot be verified", path, HASHES)
        return
    if not isinstance(stored, dict) or stored.get("algorithm") != _ALGORITHM:
        raise CheckpointIntegrityError(
            f"checkpoint {path}: {HASHES} is unreadable (expected algorithm {_ALGORITHM!r}); {_FIX}"
        )
    expected: dict = stored.get("entries", {})
    seen, differ = set(), []
    for name, value in _leaves(checkpoint):
        if name in expected:
            seen.add(name)
            if _digest(value) != expected[name]:
                differ.append(name)
    missing = [name for name in expected if name not in seen]
    if differ or missing:
        what = (
            f"entry {differ[0]!r} differs from the hash written with it"
            if differ
            else f"entry {missing[0]!r} is missing"
        )
        raise CheckpointIntegrityError(
            f"checkpoint {path}: {what} ({len(differ)} entries differ, {len(missing)} missing, "
            f"of {len(expected)}); {_FIX}"
        )


def _check_pickle_crc(path: Path) -> None:
    """Read the pickle of a zip checkpoint through `zipfile`, which checks its CRC-32: a changed
    byte there (a key, a plain value, the hashes themselves) is caught even where it still
    unpickles. Tensors are covered by `lmm_hashes`; a file that is no zip is left to torch."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename.endswith("/data.pkl"):
                archive.read(info)  # BadZipFile on a CRC mismatch


def _unreadable(
    path: Path, err: Exception, fix: str = "resume from an earlier checkpoint"
) -> CheckpointError:
    size = path.stat().st_size
    reason = f"{type(err).__name__}: {err}"
    if isinstance(err, pickle.UnpicklingError):
        # torch's message advises weights_only=False; the part that says what failed is last
        reason = "the pickle is corrupt or holds objects other than tensors and plain values ("
        reason += str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] + ")"
    return CheckpointError(
        f"checkpoint {path} ({size} bytes) cannot be read ({reason}); it is probably truncated "
        f"(a write was interrupted) or corrupt: {fix}"
    )


def _readable_file(path: Path) -> os.stat_result:
    """The file's stat; `CheckpointError` if it does not exist or is empty."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    stat = path.stat()
    if stat.st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): a write was interrupted or the disk was "
            "full; resume from an earlier checkpoint or write it again"
        )
    return stat


def _stored_hashes(text: str, key: str, what: str) -> dict:
    """The `key` mapping of a JSON hash record (`{"algorithm": ..., key: {...}}`), or a
    `CheckpointIntegrityError` saying `what` is unreadable."""
    try:
        stored = json.loads(text)
        entries = stored[key]
        if stored["algorithm"] == _ALGORITHM and isinstance(entries, dict):
            return entries
    except (ValueError, KeyError, TypeError):
        pass
    raise CheckpointIntegrityError(
        f"{what} is unreadable (expected JSON with algorithm {_ALGORITHM!r}); the file was "
        "damaged after it was written: copy it again or use an earlier checkpoint"
    )


def load_checkpoint_file(path: str | Path, verify: bool = True, mmap: bool = False) -> dict:
    """`torch.load(path, weights_only=True)`, or safetensors (`load_safetensors`, as
    `{"state_dict": tensors}`), with its hashes checked (`verify`); a bad file raises
    `CheckpointError`. `mmap` maps tensors instead of reading them (a check that does not hold
    a second copy in memory)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return {"state_dict": load_safetensors(path, verify=verify)}
    stat = _readable_file(path)
    try:
        _check_pickle_crc(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # zipfile, pickle and safetensors raise several types
        raise _unreadable(path, err) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights; "
            "expected a Lightning checkpoint or a state dict"
        )
    if verify:
        verify_hashes(checkpoint, path)
        _verified.add((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return checkpoint


def verified(path: str | Path) -> bool:
    """Whether `load_checkpoint_file` (a file) or `verify_manifest` (a sharded folder) checked
    this checkpoint, unchanged since, in this process."""
    path = Path(path)
    if path.is_dir():
        return _folder_key(path) in _verified
    if not path.is_file():
        return False
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns) in _verified


# ------------------------------------------------------------------------------ safetensors


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `tensors` as a safetensors file, atomically, with the hash of each tensor in the
    header's metadata (`lmm_hashes`: JSON `{algorithm, entries}`, the digests `add_hashes`
    gives the same tensor in a .ckpt) beside `metadata` (`format: pt` unless given).

    Tensors must not share memory (safetensors refuses shared tensors: drop tied copies)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    entries = {k: _digest(v) for k, v in tensors.items()}
    header = {"format": "pt", **dict(metadata or {})}
    header[HASHES] = json.dumps({"algorithm": _ALGORITHM, "entries": entries}, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, header)
        os.replace(tmp, path)  # readers see the old or the new file, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_safetensors(
    path: str | Path, select: Callable[[str], bool] | None = None, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those whose name `select` accepts), each checked
    against the hashes `save_safetensors` wrote (`verify`).

    A file without lmm's hashes (from the hub, transformers, another tool) loads unchecked.
    An empty, truncated or garbled file raises `CheckpointError` naming it; a tensor whose
    bytes, dtype or shape differ from its hash raises `CheckpointIntegrityError` naming it."""
    path = Path(path)
    stat = _readable_file(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = [k for k in f.keys() if select is None or select(k)]
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as err:  # SafetensorError, OSError, ValueError on a garbled header
        raise _unreadable(path, err, fix="write it again or use an earlier copy") from err
    if not verify:
        return tensors
    if HASHES not in metadata:
        log.debug("%s has no %s (not written by lmm): loaded without checking", path, HASHES)
        return tensors
    expected = _stored_hashes(
        metadata[HASHES], "entries", f"checkpoint {path}: {HASHES} in the safetensors header"
    )
    wanted = [k for k in expected if select is None or select(k)]
    differ = [k for k in names if k in expected and _digest(tensors[k]) != expected[k]]
    missing = [k for k in wanted if k not in tensors]
    unknown = [k for k in names if k not in expected]
    if differ or missing or unknown:
        if differ:
            what = f"tensor {differ[0]!r} differs from the hash written with it"
        elif missing:
            what = f"tensor {missing[0]!r} is missing"
        else:
            what = f"tensor {unknown[0]!r} was not written with the file"
        raise CheckpointIntegrityError(
            f"checkpoint {path}: {what} ({len(differ)} tensors differ, {len(missing)} missing, "
            f"{len(unknown)} unknown, of {len(expected)}); {_FIX_WRITTEN}"
        )
    if select is None:
        _verified.add((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return tensors


# ------------------------------------------------------------------ sharded checkpoint folders


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    """Every file under `folder` but the manifest (and its temporary file), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.")
    )


def _folder_key(folder: Path) -> tuple:
    """What `verified` compares for a folder: each file's name, size and mtime."""
    files = _folder_files(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        files.append(manifest)
    return (
        str(folder.resolve()),
        tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files),
    )


def write_manifest(folder: str | Path) -> Path:
    """Write `folder/lmm_hashes.json`: the size and hash of every file in a sharded checkpoint
    folder, once every rank has written its shards (the caller waits for them)."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "hash": _file_digest(p)}
        for p in _folder_files(folder)
    }
    body = json.dumps({"algorithm": _ALGORITHM, "files": files}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(body + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def verify_manifest(folder: str | Path) -> None:
    """Check every file of a sharded checkpoint folder against its `lmm_hashes.json`:
    `CheckpointError` names the first file that is missing or has another size (truncated),
    `CheckpointIntegrityError` the first whose bytes differ. A folder without a manifest
    (written before lmm wrote them, or by another tool) is logged and passes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        log.info("sharded checkpoint %s has no %s: its files cannot be verified", folder, MANIFEST)
        _verified.add(_folder_key(folder))  # said once, not at every check of the same load
        return
    files = _stored_hashes(manifest.read_text(), "files", f"checkpoint {folder}: {MANIFEST}")
    missing, resized, differ = [], [], []
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            missing.append(name)
        elif file.stat().st_size != entry["size"]:
            resized.append(
                f"{name!r} has {file.stat().st_size} bytes, {entry['size']} were written"
            )
        elif _file_digest(file) != entry["hash"]:
            differ.append(name)
    counts = (
        f"({len(missing)} missing, {len(resized)} of another size, {len(differ)} differ, of "
        f"{len(files)} files in {MANIFEST})"
    )
    if missing:
        raise CheckpointError(
            f"checkpoint {folder}: file {missing[0]!r} is missing {counts}; a save or a copy was "
            "incomplete: resume from an earlier checkpoint or copy the whole folder again"
        )
    if resized:
        raise CheckpointError(
            f"checkpoint {folder}: file {resized[0]} (truncated?) {counts}; a write or a copy "
            "was interrupted: resume from an earlier checkpoint or copy the folder again"
        )
    if differ:
        raise CheckpointIntegrityError(
            f"checkpoint {folder}: file {differ[0]!r} differs from the hash written with it "
            f"{counts}; {_FIX}"
        )
    _verified.add(_folder_key(folder))


def verify_sharded(folder: str | Path, strategy=None) -> None:
    """`verify_manifest` of a sharded checkpoint folder, read once: with a multi-process
    `strategy` global rank 0 reads the files and every rank raises its error. Every rank must
    call it (it broadcasts); a folder checked before in this process is not read again."""
    folder = Path(folder)
    if strategy is None or strategy.world_size == 1:
        if not verified(folder):
            verify_manifest(folder)
        return
    failure = None
    if strategy.global_rank == 0 and not verified(folder):
        try:
            verify_manifest(folder)
        except CheckpointError as err:
            failure = (type(err), str(err))
        except Exception as err:  # every rank must hear of it, or the others wait forever
            failure = (CheckpointError, f"checkpoint {folder} cannot be read ({err!r})")
    failure = strategy.broadcast(failure)
    if failure is not None:
        kind, message = failure
        raise kind(message)
    _verified.add(_folder_key(folder))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically and loads weights-only with clear errors
    (`load_checkpoint_file`); the `lmm` CLI's default. A URL (`s3://`, `https://`) is left to
    Lightning's `TorchCheckpointIO` (fsspec), its hashes checked by `CheckpointHashes`."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        get_filesystem(path).makedirs(str(path.parent), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        if HASHES not in checkpoint:
            add_hashes(checkpoint)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        # `--ckpt_path` was checked by the CLI a moment ago: read it, do not hash it again
        return load_checkpoint_file(path, verify=not verified(path))


def sharded_weights(
    folder: str | Path, include: Sequence[str] = (".*",), exclude: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """The model weights of a sharded (FSDP2, torch.distributed.checkpoint) checkpoint folder
    whose names match `include` and no `exclude`, as whole tensors, in one process: what a
    later stage's `init_from` takes from a sharded stage. The folder's manifest is checked
    first; optimizer states are not read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    verify_sharded(folder)
    reader = FileSystemReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # no .metadata: not a torch.distributed.checkpoint folder
        raise CheckpointError(
            f"checkpoint {folder} is a folder but not a sharded checkpoint (its .metadata cannot "
            f"be read: {type(err).__name__}: {err}); give a .ckpt file or an FSDP2 checkpoint folder"
        ) from err
    prefix = "state_dict."
    wanted = {}
    for key, item in metadata.state_dict_metadata.items():
        name = key[len(prefix) :]
        if not key.startswith(prefix) or not isinstance(item, TensorStorageMetadata):
            continue
        if any(re.fullmatch(p, name) for p in include) and not any(
            re.fullmatch(p, name) for p in exclude
        ):
            wanted[name] = torch.empty(item.size, dtype=item.properties.dtype)
    if wanted:
        with warnings.catch_warnings():  # one process on purpose; torch says it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load({"state_dict": wanted}, storage_reader=reader, no_dist=True)
    return wanted


def init_from_checkpoint(
    module: nn.Module,
    path: str | Path,
    include: Sequence[str] = (".*",),
    exclude: Sequence[str] = (),
) -> list[str]:
    """Load the weights of `path` whose names match `include` (and no `exclude`) into `module`.

    For stage-wise training, e.g. stage 2 takes the stage-1 connector: `include:
    ["model\\.connector\\..*"]`. Every selected key must exist in `module` with the same
    shape, or the error lists the ones that do not. `path` may be a sharded (FSDP2) checkpoint
    folder: its manifest is checked and only the selected weights are read. Returns the loaded
    names.
    """
    if Path(path).is_dir():
        state = sharded_weights(path, include, exclude)
    else:
        checkpoint = load_checkpoint_file(path)
        checkpoint.pop(HASHES, None)
        state = checkpoint.get("state_dict", checkpoint)
    keep = [
        k
        for k in state
        if any(re.fullmatch(p, k) for p in include) and not any(re.fullmatch(p, k) for p in exclude)
    ]
    if not keep:
        raise ValueError(f"no weight of {path} matches include={list(include)}")
    own = module.state_dict()
    missing = [k for k in keep if k not in own]
    shapes = [k for k in keep if k in own and own[k].shape != state[k].shape]
    if missing or shapes:
        raise ValueError(
            f"{path}: {len(missing)} selected weights are not in the model (e.g. {missing[:3]}), "
            f"{len(shapes)} have another shape (e.g. {shapes[:3]}); check include/exclude"
        )
    module.load_state_dict({k: state[k] for k in keep}, strict=False)
    log.info("initialised %d weights from %s", len(keep), path)
    return keep
