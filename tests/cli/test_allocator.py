"""The host allocator of the `lmm` command (lmm.utils.allocator, lmm.launch): jemalloc or
tcmalloc preloaded by a re-exec when the machine has one; the system's when asked or absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmm.utils import allocator
from lmm.utils.errors import UserError

REPO = Path(__file__).parents[2]
PROBE = "from lmm.utils import allocator; allocator.reexec(); print(allocator.loaded())"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, allocator.ACTIVE_ENV)}
    base = {**base, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=60
    )


def _installed() -> str:
    """The allocator `auto` picks here; CI installs libjemalloc2 (.ci/run), elsewhere skip."""
    name, path = allocator.choose("auto")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install libjemalloc2 (.ci/run) for the allocator tests")
        pytest.skip("neither jemalloc nor tcmalloc is installed")
    return name


def test_reexec_preloads_the_installed_allocator():
    name = _installed()
    r = _run(PROBE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name  # the library is mapped into the re-executed process


def test_reexec_runs_once_and_keeps_the_command_line():
    _installed()
    code = "import sys; " + PROBE + "; print(sys.argv[1:])"
    r = subprocess.run(
        [sys.executable, "-c", code, "fit", "--x=1"],
        env={**os.environ, "PYTHONPATH": str(REPO), allocator.ENV: "auto"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == "['fit', '--x=1']"
    assert len(r.stdout.splitlines()) == 2  # printed once: the first process was replaced


def test_system_allocator_when_asked():
    r = _run(PROBE, **{allocator.ENV: "system"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "system"


def test_unknown_or_missing_allocator_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match="one of auto, jemalloc, tcmalloc, system"):
        allocator.choose("mimalloc")
    monkeypatch.setattr(allocator, "find", lambda name: None)
    with pytest.raises(UserError, match="apt-get install libjemalloc2"):
        allocator.choose("jemalloc")
    assert allocator.choose("auto") == ("system", None)  # auto: nothing found, nothing loaded


def test_lmm_command_reports_a_bad_choice_without_traceback():
    lmm = Path(sys.executable).with_name("lmm")
    if not lmm.is_file():
        pytest.skip("the lmm console script is not installed in this environment")
    env = {**os.environ, allocator.ENV: "bogus"}
    env.pop(allocator.ACTIVE_ENV, None)
    r = subprocess.run([str(lmm), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "LMM_ALLOCATOR='bogus'" in r.stderr and "Traceback" not in r.stderr


def test_environment_prepends_and_keeps_the_user_settings():
    env = allocator.environment("jemalloc", "/x/libjemalloc.so.2", {"LD_PRELOAD": "/y/libz.so"})
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so.2:/y/libz.so"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert env[allocator.ACTIVE_ENV] == "jemalloc"
    mine = allocator.environment("jemalloc", "/x/libjemalloc.so.2", {"MALLOC_CONF": "narenas:1"})
    assert mine["MALLOC_CONF"] == "narenas:1"
    assert "MALLOC_CONF" not in allocator.environment("tcmalloc", "/t.so", {})
