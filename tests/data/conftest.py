"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from lmm.data.processor import Processor
from lmm.data.templates import Llama3
from lmm.data.tokenization import load_tokenizer
from tests.data.bad_input import TinySpec


@pytest.fixture
def processor(tiny_assets):
    """A Llama-3 processor of the tiny tokenizer, 4 tokens per 8-px image, 256 tokens."""
    return Processor(load_tokenizer(str(tiny_assets["tokenizer"])), Llama3(), TinySpec(), 256)
