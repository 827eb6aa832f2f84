"""Hermetic test setup: offline, private HF and lmm caches, 2 threads; tiny assets built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a loaded 2-core machine spinning threads
# slowed 2-thread torch down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_DATASETS_CACHE"] = str(home / "datasets")
    os.environ["LMM_CACHE"] = str(home / "lmm")  # imports of transformers folders
    yield


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic shapes dataset (all tasks)."""
    from lmm.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, train=64, val=16, test=16, image_size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer + 2-layer Llama (hidden 64) + 2-layer CLIP tower (32 px, patch 8), on disk."""
    from lmm.data.synthetic import corpus
    from lmm.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny"), corpus())
