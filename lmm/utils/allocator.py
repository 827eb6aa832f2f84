"""The host memory allocator of an lmm process: jemalloc or tcmalloc when the machine has one.

A training step on the CPU allocates and frees hundreds of activation-sized tensors. glibc's
malloc serves the large ones from fresh `mmap`s (its threshold adapts up to 32 MiB only) and
returns them to the kernel when freed, so every step page-faults its activations in again,
cold in cache. jemalloc and tcmalloc keep freed memory for the next request: on the ~50M LLaVA
step (docs/benchmarks.md) 20-25% less time, the kernel's share of it from ~25% to a few percent.
This is what PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) recommends.

A process cannot change its allocator after it started, so the `lmm` command (`lmm.launch`)
asks for one before anything else is imported: `reexec()` starts the same command again with
the library in `LD_PRELOAD`. `LMM_ALLOCATOR` chooses: `auto` (default: jemalloc, else
tcmalloc, else the system's with an info line saying how to get one), `jemalloc`, `tcmalloc`
(an error naming the package when missing) or `system` (never re-exec).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from lmm.utils.errors import UserError

ENV = "LMM_ALLOCATOR"
# Set in the re-executed process: what it runs with (and that it must not re-exec again).
ACTIVE_ENV = "LMM_ALLOCATOR_ACTIVE"
LIBRARIES = {
    "jemalloc": ("jemalloc", ["libjemalloc.so.2", "libjemalloc.so"]),
    "tcmalloc": ("tcmalloc_minimal", ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4"]),
}
# Where a Debian / Ubuntu / conda install puts them, besides the loader's own search path.
PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
# jemalloc: keep freed pages for reuse (never decay them back to the kernel during a run), as
# torch.backends.xeon.run_cpu sets it; lengthy idle periods do not matter for a training run.
JEMALLOC_CONF = "background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find(name: str) -> str | None:
    """The path of allocator `name`'s shared library on this machine, or None."""
    stem, sonames = LIBRARIES[name]
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    dirs += [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu")]
    dirs += [Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    for folder in dirs:
        for soname in sonames:
            if (folder / soname).is_file():
                return str(folder / soname)
    found = ctypes.util.find_library(stem)
    return found


def loaded() -> str:
    """The allocator this process runs with: `jemalloc`, `tcmalloc` or `system`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name, (stem, _) in LIBRARIES.items():
        if f"lib{stem}" in maps:
            return name
    return "system"


def choose(requested: str | None = None) -> tuple[str, str | None]:
    """(allocator, library path) for `requested` (default `$LMM_ALLOCATOR`, `auto`): `system`
    with None when there is nothing to load."""
    requested = (requested or os.environ.get(ENV) or "auto").strip().lower()
    if requested == "system" or not sys.platform.startswith("linux"):
        return "system", None
    if requested == "auto":
        for name in LIBRARIES:
            path = find(name)
            if path:
                return name, path
        return "system", None
    if requested not in LIBRARIES:
        raise UserError(
            f"{ENV}={requested!r} is not an allocator lmm knows. Fix: one of auto, "
            f"{', '.join(LIBRARIES)}, system"
        )
    path = find(requested)
    if path is None:
        raise UserError(
            f"{ENV}={requested}: no {requested} library on this machine. Fix: install it "
            f"(Debian/Ubuntu: apt-get install {PACKAGES[requested]}; conda: conda install "
            f"{requested}), or set {ENV}=auto or system"
        )
    return requested, path


def environment(name: str, path: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with allocator `name` (library `path`) preloaded for a new process."""
    env = dict(env)
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env["LD_PRELOAD"] = ":".join([path, *preload])
    if name == "jemalloc" and "MALLOC_CONF" not in env:
        env["MALLOC_CONF"] = JEMALLOC_CONF
    env[ACTIVE_ENV] = name
    return env


def reexec(argv: list[str] | None = None) -> None:
    """Start this command again under the chosen allocator (`choose`) when it does not run
    with it already; return when there is nothing to do. `argv`: the interpreter's command
    line (default `sys.orig_argv`). Call it before torch is imported: nothing runs twice."""
    if os.environ.get(ACTIVE_ENV):
        return  # this process is the re-executed one (or a child of one)
    name, path = choose()
    if path is None or loaded() == name:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment(name, path, os.environ))


def describe() -> str:
    """One line for the log: the allocator this process runs with, and how to get a faster
    one when it runs with the system's."""
    name = loaded()
    if name != "system":
        return f"host memory allocator: {name}"
    hint = ", ".join(f"{PACKAGES[n]}" for n in LIBRARIES)
    return (
        "host memory allocator: the system's malloc (CPU steps run ~20% faster with jemalloc "
        f"or tcmalloc: apt-get install {hint}; LMM_ALLOCATOR chooses)"
    )
