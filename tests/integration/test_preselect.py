"""``preselect="auto"``: candidates only where a timed probe says they save time, else full scoring with a note.

The probe's timings are replaced by fixed numbers (monkeypatched) wherever a decision is asserted, so no test
depends on the machine's speed; one test runs the real probe and checks only that its figures are sane.
Training sets here come in batches of at most 32 (180 examples), so they are large enough to be probed.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from helpers import cross_entropy_per_example, digits, loader
from helpers.distributed import explain_on_threads
from torch import nn
from torch.utils.data import TensorDataset

import lightning_influence as li
import lightning_influence.distributed.scoring as scoring
from lightning_influence.config import PRESELECT_PROBE_EXAMPLES, ExplainConfig
from lightning_influence.core.candidates import PreselectionEstimate
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.distributed.collectives import SingleProcess

N_TRAIN = 180
DAMPING = 1.0


@pytest.fixture(scope="module")
def data():
    x, y = digits(torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    return model, x[:N_TRAIN], y[:N_TRAIN], x[1500:1504], y[1500:1504]


def _probe_returns(monkeypatch, feature_seconds: float, scoring_seconds: float) -> None:
    monkeypatch.setattr(scoring, "time_preselection", lambda *args, **kwargs: (feature_seconds, scoring_seconds, 0.0))


def test_estimate_pays_exactly_when_features_are_cheaper_than_the_expected_union_saves():
    n, k, q = 1500, 150, 8
    threshold = (1 - k / n) ** q  # 0.430: share of full scoring the candidates' union is expected to leave out
    assert PreselectionEstimate(n, k, q, 1.0, 1.0).expected_union == pytest.approx(n * (1 - threshold))
    assert PreselectionEstimate(n, k, q, 0.99 * threshold, 1.0).pays
    assert not PreselectionEstimate(n, k, q, 1.01 * threshold, 1.0).pays
    assert not PreselectionEstimate(n, n, 1, 0.0, 1.0).pays  # k = n: the union is everything, nothing to save
    assert not PreselectionEstimate(n, k, q, 0.0, 1e-3, fixed_seconds=2.0).pays  # the test features count too
    note = PreselectionEstimate(n, k, q, 1e-3, 1e-3).note()
    assert "num_candidates=150" in note and "preselect='always'" in note and "\n" not in note


def test_auto_scores_everything_and_warns_when_candidates_would_not_save_time(data, monkeypatch):
    model, x, y, xt, yt = data
    full = li.influence(model, cross_entropy_per_example, loader(x, y, 32), (xt, yt), solver="exact", damping=DAMPING)
    _probe_returns(monkeypatch, feature_seconds=1.0, scoring_seconds=1.0)
    with pytest.warns(UserWarning, match="would not save time"):
        fallback = li.influence(model, cross_entropy_per_example, loader(x, y, 32), (xt, yt), solver="exact",
                                damping=DAMPING, num_candidates=20)
    torch.testing.assert_close(fallback, full, rtol=1e-10, atol=1e-12)  # every example scored, no NaN
    with pytest.warns(UserWarning, match="would not save time"):
        top = li.top_influences(model, cross_entropy_per_example, loader(x, y, 32), (xt, yt), solver="exact",
                                damping=DAMPING, num_candidates=20, top_k=3)
    assert torch.equal(top.harmful_indices, full.topk(3, dim=1).indices)  # the exact top lists


def test_auto_preselects_when_features_are_cheap_and_always_ignores_the_probe(data, monkeypatch):
    model, x, y, xt, yt = data
    _probe_returns(monkeypatch, feature_seconds=0.0, scoring_seconds=1.0)
    sparse = li.influence(model, cross_entropy_per_example, loader(x, y, 32), (xt, yt), solver="exact", damping=DAMPING,
                          num_candidates=20)
    assert (~sparse.isnan()).sum(dim=1).tolist() == [20] * len(xt)
    _probe_returns(monkeypatch, feature_seconds=1.0, scoring_seconds=1.0)
    forced = li.influence(model, cross_entropy_per_example, loader(x, y, 32), (xt, yt), solver="exact",
                          damping=DAMPING, num_candidates=20, preselect="always")
    torch.testing.assert_close(forced, sparse, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="`preselect`"):
        ExplainConfig(num_candidates=5, preselect="never")


def test_a_training_set_of_a_few_batches_is_scored_whole_without_a_probe(data, monkeypatch):
    model, x, y, xt, yt = data
    monkeypatch.setattr(scoring, "time_preselection", lambda *args, **kwargs: pytest.fail("probed"))
    with pytest.warns(UserWarning, match="only a few batches"):  # 180 examples in batches of 64: under 3 batches
        scores = li.influence(model, cross_entropy_per_example, loader(x, y, 64), (xt, yt), solver="exact",
                              damping=DAMPING, num_candidates=20)
    assert not scores.isnan().any()


def test_explain_notes_the_fallback_in_the_trust_report_and_every_rank_decides_alike(data, monkeypatch):
    model, x, y, _, _ = data
    vx, vy = digits(torch.float64)
    train = IndexedData(TensorDataset(x, y), batch_size=16)
    val = IndexedData(TensorDataset(vx[1500:1530], vy[1500:1530]))
    settings = ExplainConfig(top_k=4, num_worst=3, num_candidates=20, keep_full_scores=True)
    _probe_returns(monkeypatch, feature_seconds=1.0, scoring_seconds=1.0)
    with pytest.warns(UserWarning, match="would not save time"):
        (single,) = explain_on_threads(1, model, train, val, settings, DAMPING)
    assert not single.full_scores.isnan().any()
    notes = [w for w in single.trust.warnings if w.code == "candidates_skipped"]
    assert len(notes) == 1 and notes[0].severity == "info" and "would not save time" in notes[0].message
    # ranks that time the probe differently still take one decision: the gathered timings are averaged
    lock, answers = threading.Lock(), itertools.cycle([(2.0, 1.0, 0.0), (0.0, 1.0, 0.0)])

    def probe(*args, **kwargs):
        with lock:
            return next(answers)

    monkeypatch.setattr(scoring, "time_preselection", probe)
    with pytest.warns(UserWarning, match="would not save time"):  # mean 1.0 / 1.0: full scoring on both ranks
        ranks = explain_on_threads(2, model, train, val, settings, DAMPING)
    assert all(any(w.code == "candidates_skipped" for w in r.trust.warnings) for r in ranks)
    assert all(r.score_shard is not None and r.score_shard.world_size == 2 for r in ranks)  # full scoring's shards


def test_the_real_probe_gives_positive_per_example_times(data):
    model, x, y, xt, yt = data
    train = IndexedData(TensorDataset(x, y), batch_size=16)
    problem = InfluenceProblem(model, cross_entropy_per_example, train.loader(), DAMPING, li.ExactConfig())
    settings = ExplainConfig(num_candidates=20)
    with analysis_mode(model):
        estimate = scoring.estimate_preselection(problem, (xt, yt), problem.gradients((xt, yt)), train, settings,
                                                 SingleProcess(), cross_entropy_per_example)
    assert (estimate.n_train, estimate.k, estimate.q) == (N_TRAIN, 20, len(xt))
    assert 0 < estimate.feature_seconds < 1 and 0 < estimate.scoring_seconds < 1 and estimate.fixed_seconds >= 0
    assert estimate.probed and PRESELECT_PROBE_EXAMPLES >= 16  # the probe is the first batch of 16
