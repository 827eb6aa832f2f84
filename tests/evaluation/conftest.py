"""Helpers for the benchmark tests: write records in the published format next to empty images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def write_records(tmp_path):
    """Write `records` as JSON (or JSON lines) and touch every listed media file under tmp_path."""

    def write(records, name: str = "data.json", media: tuple[str, ...] = ()) -> Path:
        for rel in media:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).touch()
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        else:
            path.write_text(json.dumps(records), encoding="utf-8")
        return path

    return write
