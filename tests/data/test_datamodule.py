"""ChatDataModule: training from a file or a mixture YAML, packed or padded, through TrainStream."""

from __future__ import annotations

from tests.helpers import tiny_data, tiny_llava


def test_mixture_yaml_trains_through_the_stream(tiny_assets, synthetic_data, tmp_path):
    yaml = tmp_path / "mix.yaml"
    yaml.write_text(
        "datasets:\n"
        f"  - json_path: {synthetic_data / 'train.json'}\n"
        "    sampling_strategy: first:10\n"
        f"  - json_path: {synthetic_data / 'val.json'}\n"
        "    sampling_strategy: end:50%\n"
    )
    module = tiny_llava(tiny_assets)
    dm = tiny_data(synthetic_data, module, batch_size=3)
    dm.files["train"] = str(yaml)
    batches = list(dm.train_stream())
    ids = [i for b in batches for i in b.ids]
    assert len(ids) == 10 + 8 and len(set(ids)) == len(ids)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 3]


def test_packed_stream_fills_rows(tiny_assets, synthetic_data):
    module = tiny_llava(tiny_assets)
    dm = tiny_data(synthetic_data, module, batch_size=4, pack_tokens=200, max_length=200)
    batches = list(dm.train_stream())
    samples = sum(len(lens) for b in batches for lens in b.seq_lens) - sum(
        lens.count(1) for b in batches for lens in b.seq_lens
    )
    assert samples == 64
    rows = [r for b in batches for r in b.attention_mask]
    fill = sum(int(r.sum()) for r in rows) / (len(rows) * 200)
    assert fill > 0.8, fill
    assert all(b.input_ids.shape[1] <= 200 for b in batches)
