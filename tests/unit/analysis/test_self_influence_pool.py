"""With training signals and a candidate count, self-influence is computed only for the signals' most suspicious
examples (``SELF_INFLUENCE_POOL_FACTOR`` x the count, at least ``MISLABEL_SHOWN``): the candidates and their
self-influence are those of the whole-set pass, every example's loss is still measured."""

from __future__ import annotations

import torch
from helpers import cross_entropy_per_example, flipped_digits, train_recording_signals

from lightning_influence.analysis import mislabel
from lightning_influence.analysis.mislabel import SELF_INFLUENCE_POOL_FACTOR, find_mislabel_candidates
from lightning_influence.config import MISLABEL_SHOWN, LowRankConfig, ProblemConfig
from lightning_influence.reporting import mislabel_to_dict

N = 300
SETUP = ProblemConfig(solver=LowRankConfig(rank=8), damping=0.1)


def _trained():
    _, _, model, data = flipped_digits(N, flips=10)
    recorder = train_recording_signals(model, data)
    return model, data, recorder


def test_signals_and_a_count_compute_self_influence_for_the_pool_only(monkeypatch):
    model, data, recorder = _trained()
    whole = find_mislabel_candidates(model, cross_entropy_per_example, data, SETUP, None, recorder=recorder)
    scored = []
    original = mislabel.self_influence_shard

    def counting(problem, train, indices, on_scored=None):
        scored.extend(indices)
        return original(problem, train, indices, on_scored)

    monkeypatch.setattr(mislabel, "self_influence_shard", counting)
    count = 5
    report = find_mislabel_candidates(model, cross_entropy_per_example, data, SETUP, count, recorder=recorder)
    pool_size = max(SELF_INFLUENCE_POOL_FACTOR * count, MISLABEL_SHOWN)
    assert pool_size < N and len(scored) == pool_size
    expected_pool = torch.argsort(recorder.scores(), descending=True, stable=True)[:pool_size]
    assert sorted(scored) == sorted(expected_pool.tolist())
    assert report.signals["self_influence_examples"] == pool_size
    finite = torch.isfinite(report.scores)
    assert int(finite.sum()) == pool_size and finite[expected_pool].all()
    # the same candidates, with the whole pass's self-influence; every example's loss
    assert [c.train_index for c in report.candidates] == [c.train_index for c in whole.candidates[:count]]
    for got, full in zip(report.candidates, whole.candidates):
        assert got.self_influence == full.self_influence and got.loss == full.loss
    torch.testing.assert_close(report.rankings["loss"], whole.rankings["loss"])
    torch.testing.assert_close(report.scores[finite], whole.scores[finite])
    as_json = mislabel_to_dict(report)
    assert as_json["training_signals"]["self_influence_examples"] == pool_size
    assert set(as_json["rankings"]["self_influence"]) <= set(expected_pool.tolist())


def test_without_signals_or_with_every_example_the_pass_covers_the_whole_set():
    model, data, recorder = _trained()
    for report in (find_mislabel_candidates(model, cross_entropy_per_example, data, SETUP, 5),
                   find_mislabel_candidates(model, cross_entropy_per_example, data, SETUP, None, recorder=recorder)):
        assert torch.isfinite(report.scores).all() and len(report.scores) == N
