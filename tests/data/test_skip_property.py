"""A property of the training pipeline (reader → processor → stream → collator) with
`on_bad_record: skip`: for any mix of good and bad records, any shuffle buffer, batch size,
packing, modality grouping and number of ranks, every good record is trained exactly once per
epoch and every bad record is counted exactly once per epoch, by its file and id."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lmm.data.formats import iter_samples, read_records
from lmm.data.processor import Processor
from lmm.data.stream import NoUsableRecordsError, TrainStream
from lmm.data.templates import Llama3
from lmm.data.tokenization import load_tokenizer
from tests.data.bad_input import TinySpec

# Each kind: (the JSON line, or raw bytes, and whether it trains). Bad kinds fail where fit
# finds them: in the reader (line, record, media path) or in the processor (the decode).
_TURNS = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "green"}]
KINDS: dict[str, tuple[object, bool]] = {
    "text": ({"conversation": _TURNS}, True),
    "image": ({"images": ["ok.png"], "conversation": _TURNS}, True),
    "two_images": ({"images": ["ok.png", "ok.png"], "conversation": _TURNS}, True),
    "broken_json": (b'{"id": "x", "conversation": [', False),
    "not_utf8": (b'{"id": "caf\xe9"}', False),
    "unknown_role": ({"conversation": [{"role": "robot", "content": "x"}]}, False),
    "empty_answer": ({"conversation": [_TURNS[0], {"role": "assistant", "content": ""}]}, False),
    "missing_image": ({"images": ["missing.png"], "conversation": _TURNS}, False),
    "marker_mismatch": (
        {"images": ["ok.png"], "conversation": [{"role": "user", "content": "<image><image>"}]},
        False,
    ),
    "not_an_image": ({"images": ["fake.png"], "conversation": _TURNS}, False),  # processor
}


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("property")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(folder / "ok.png")
    (folder / "fake.png").write_text("not an image")
    tokenizer = load_tokenizer(str(tiny_assets["tokenizer"]))
    return folder, Processor(tokenizer, Llama3(), TinySpec(), 256), itertools.count()


def _write(folder: Path, kinds: list[str], n: int) -> tuple[Path, dict[str, bool]]:
    """The JSON-lines file of `kinds` (record `r{i}` on line i+1) and each key's goodness."""
    lines, good = [], {}
    for i, kind in enumerate(kinds):
        record, trains = KINDS[kind]
        if isinstance(record, bytes):
            lines.append(record)
            good[f"line {i + 1}"] = trains  # a line that is no record is named by its number
        else:
            lines.append(json.dumps({"id": f"r{i}", **record}).encode())
            good[f"r{i}"] = trains
    path = folder / f"data{n}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, good


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=24),
    buffer_size=st.integers(1, 8),
    batch_size=st.integers(1, 4),
    pack=st.booleans(),
    group=st.booleans(),
    world_size=st.sampled_from([1, 2]),
    seed=st.integers(0, 3),
)
def test_every_good_record_once_and_every_skip_counted(
    setup, kinds, buffer_size, batch_size, pack, group, world_size, seed
):
    folder, processor, counter = setup
    path, good = _write(folder, kinds, next(counter))

    def source(epoch):
        return iter_samples(read_records(path), source=path)

    streams = []
    for rank in range(world_size):
        stream = TrainStream(
            source,
            processor,
            batch_size=batch_size,
            pack_tokens=256 if pack else None,
            buffer_size=buffer_size,
            seed=seed,
            on_bad_record="skip",
            group_by_modality_length=group,
        )
        stream.rank, stream.world_size = rank, world_size
        streams.append(stream)
    goods = sorted(k for k, ok in good.items() if ok)
    bads = sorted(k for k, ok in good.items() if not ok)
    for epoch in range(2):
        trained, skipped = Counter(), Counter()
        try:
            for stream in streams:
                stream.epoch = epoch
                for batch in stream:
                    assert batch.stream_position[0] == epoch
                    if len(batch) and not (batch.labels == -100).all():  # not a masked copy
                        trained.update(i for row in batch.ids for i in row.split("+"))
                    for file, record_id, problem in batch.skipped_records:
                        assert file == str(path) and problem
                        skipped[record_id] += 1
        except NoUsableRecordsError:
            # only when no record of the file can be planned: every one fails in the reader
            assert not goods and all(k != "not_an_image" for k in kinds)
            continue
        assert sorted(trained.elements()) == goods  # each good record once
        assert sorted(skipped.elements()) == bads  # each bad record counted once
