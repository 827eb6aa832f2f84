"""Compiled decoder layers: what happens without a C++ compiler (the equivalence and packing
parity through the compiled path are in tests/families/test_llava.py and tests/data/test_packing.py)."""

from __future__ import annotations

import logging

from lmm.components import compiled
from tests.helpers import tiny_llava


def test_no_cpu_compiler_leaves_the_layers_eager(tiny_assets, monkeypatch, caplog):
    module = tiny_llava(tiny_assets)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(compiled.shutil, "which", lambda name: None)
            compiled.cpu_compiler.cache_clear()
            with caplog.at_level(logging.WARNING, logger="lmm"):
                assert compiled.compile_layers(module.model.llm.model, "cpu") == 0
    finally:
        compiled.cpu_compiler.cache_clear()  # the real PATH's answer for the next tests
    assert "no C++ compiler" in caplog.text
    layers = module.model.llm.model.model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)
