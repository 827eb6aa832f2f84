from __future__ import annotations

import math

import pytest
import torch

from lmm.data.sample import BadRecordError, Media
from lmm.evaluation.tasks import videofeedback
from lmm.evaluation.tasks.videofeedback import VideoFeedbackSpearman, average_ranks, spearman

GPT = "visual quality: 3\ntemporal consistency: 4\ndynamic degree: 2\ntext-to-video alignment: 1\nfactual consistency: 3"


def test_parse():
    assert videofeedback.parse(GPT) == [3.0, 4.0, 2.0, 1.0, 3.0]
    assert videofeedback.parse("visual quality: 5\ntemporal consistency: 2") == [
        0.0,
        2.0,
        0.0,
        0.0,
        0.0,
    ]
    assert videofeedback.parse("") == [0.0] * 5
    # Python's `\d` matches the full-width "２" and int("２") == 2, as in the official script.
    assert videofeedback.parse("visual quality: ２") == [2.0, 0.0, 0.0, 0.0, 0.0]


def test_average_ranks():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_with_ties():
    # x = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]; y = [1, 3, 2, 4] -> ranks [1, 3, 2, 4]
    # centred: x [-1.5, 0, 0, 1.5], y [-1.5, 0.5, -0.5, 1.5]; sum xy = 4.5
    # sum x^2 = 4.5, sum y^2 = 5 -> rho = 4.5 / sqrt(22.5) = 0.948683...
    rho = spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 4]))
    assert rho == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.tensor([2.0, 2, 2]), torch.tensor([1.0, 2, 3])))


def test_metric_per_dimension():
    metric = VideoFeedbackSpearman(dimensions=["a", "b"])
    metric.update(
        [[1, 2], [2, 2], [2, 2], [3, 2]], [{"scores": s} for s in ([1, 1], [3, 2], [2, 3], [4, 4])]
    )
    out = metric.compute()
    assert float(out["a"]) == pytest.approx(100 * 4.5 / math.sqrt(22.5))
    assert torch.isnan(out["b"])  # constant predictions
    assert float(out["mean"]) == pytest.approx(float(out["a"]))


def test_read(write_records, tmp_path):
    recs = [
        {
            "id": "vid1",
            "images": ["f0.jpg", "f1.jpg"],
            "conversations": [
                {"from": "human", "value": "Rate the video.\n<image><image>"},
                {"from": "gpt", "value": GPT},
            ],
        }
    ]
    [s] = videofeedback.read(write_records(recs, media=("vid1/f0.jpg", "vid1/f1.jpg")))
    assert s.meta["scores"] == [3.0, 4.0, 2.0, 1.0, 3.0]
    assert s.images == [tmp_path / "vid1/f0.jpg", tmp_path / "vid1/f1.jpg"]
    assert s.turns[0].parts == ["Rate the video.\n", Media(0), Media(1)]
    recs[0]["conversations"][1]["value"] = "visual quality: 3"
    with pytest.raises(BadRecordError, match="1 gold scores"):
        videofeedback.read(write_records(recs, media=("vid1/f0.jpg", "vid1/f1.jpg")))


def test_videofeedback_breakdown():
    # One rho x100 per dimension, rounded to 4 decimals as get_spearman_corr.py stores it; mean.
    metric = VideoFeedbackSpearman(dimensions=["a", "b"])
    metric.update(
        [[1, 1], [2, 3], [2, 2], [3, 4]], [{"scores": s} for s in ([1, 2], [3, 1], [2, 3], [4, 4])]
    )
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["a"] == round(100 * 4.5 / math.sqrt(22.5), 4) == 94.8683
    assert out["b"] == round(
        100 * spearman(torch.tensor([1.0, 3, 2, 4]), torch.tensor([2.0, 1, 3, 4])), 4
    )
    assert out["mean"] == pytest.approx((out["a"] + out["b"]) / 2)


def test_read_hub_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {
            "id": "v9",
            "images": ["00.jpg", "01.jpg"],
            "conversations": [
                {"from": "human", "value": "Rate.\n<image> <image>"},
                {"from": "gpt", "value": GPT},
            ],
        }
    ]
    shard = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), shard)
    [s] = videofeedback.read(shard, tmp_path / "frames", check_media=False)
    assert s.meta["scores"] == [3.0, 4.0, 2.0, 1.0, 3.0]
    assert s.images == [
        tmp_path / "frames" / "v9" / "00.jpg",
        tmp_path / "frames" / "v9" / "01.jpg",
    ]
