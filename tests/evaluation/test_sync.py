"""The metrics' states reduce across ranks: two half-runs merged equal one full run."""

from __future__ import annotations

import pytest

from lmm.evaluation.tasks.mmbench import MMBenchCircular
from lmm.evaluation.tasks.mme import MMEScore
from lmm.evaluation.tasks.vqav2 import VQAAccuracy


def _merged(make, preds, metas):
    rank0, rank1 = make(), make()
    rank0.update(preds[:2], metas[:2])
    rank1.update(preds[2:], metas[2:])
    rank0.merge_state(rank1)  # applies each state's dist_reduce_fx
    return rank0.compute()


def test_grouped_mean_merges():
    metas = [{"answers": ["yes"] * 10, "answer_type": "yes/no"}] * 4
    out = _merged(VQAAccuracy, ["yes", "no", "yes", "yes"], metas)
    assert float(out["accuracy"]) == pytest.approx(75.0)


def test_circular_group_split_across_ranks():
    # One group, its 4 copies split 2/2 between ranks; one copy wrong -> 0 after merging.
    metas = [{"group": 1, "index": 1 + k * 1_000_000, "answer": "A"} for k in range(4)]
    out = _merged(MMBenchCircular, ["A", "A", "A", "B"], metas)
    assert float(out["circular"]) == 0.0


def test_mme_pair_split_across_ranks():
    metas = [{"category": "count", "pair_id": p, "answer": "yes"} for p in (0, 1, 0, 1)]
    out = _merged(MMEScore, ["yes", "yes", "no", "yes"], metas)
    # acc 3/4 = 75; image 0 has a wrong answer on "rank 1": acc+ 1/2 = 50 -> 125
    assert float(out["count/score"]) == pytest.approx(125.0)
