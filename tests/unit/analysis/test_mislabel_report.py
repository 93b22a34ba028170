"""The mislabel report with and without training signals: its ranking, the named rankings, and the figures
that the no-signals note quotes, recomputed from benchmarks/mislabel-results-v1.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers import cross_entropy_per_example, flipped_digits, train_recording_signals

from lightning_influence.analysis.mislabel import find_mislabel_candidates
from lightning_influence.config import NO_SIGNALS_NOTE, POSTHOC_MISLABEL_AUROC, LowRankConfig, ProblemConfig
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.reporting import mislabel_markdown, mislabel_to_dict, write_mislabel_report

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "mislabel-results-v1.json"


def test_no_signals_note_quotes_the_benchmark_results_file():
    results = json.loads(RESULTS.read_text())["results"]
    for key, ranking in (("self_influence", "si_final"), ("training_signals", "el2n_window")):
        means = [statistics.mean(results[f"{model}/{noise}"]["per_seed"][ranking]["auroc"])
                 for model in ("mlp", "cnn") for noise in ("asym10", "uniform30", "hard30")]
        assert POSTHOC_MISLABEL_AUROC[key] == (round(min(means), 3), round(max(means), 3)), key
    low, high = POSTHOC_MISLABEL_AUROC["self_influence"]
    assert f"AUROC {low}-{high}" in NO_SIGNALS_NOTE


def _problem(n: int = 120):
    _, _, model, data = flipped_digits(n, flips=6)
    return model, data


class _Scalars:
    """A SummaryWriter stand-in that keeps the scalars."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag, value, global_step=None):
        self.scalars[tag] = value

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_without_signals_ranks_by_self_influence_and_says_what_it_costs():
    model, data = _problem()
    report = find_mislabel_candidates(model, cross_entropy_per_example, data,
                                      ProblemConfig(solver=LowRankConfig(rank=8), damping=0.1), 5)
    assert report.ranking == "self_influence" and report.signals is None
    assert [c.train_index for c in report.candidates] == report.scores.argsort(stable=True)[:5].tolist()
    as_json = mislabel_to_dict(report)
    assert as_json["training_signals"] == {"recorded": False, "note": NO_SIGNALS_NOTE}
    assert as_json["rankings"]["self_influence"] == [c.train_index for c in report.candidates]
    assert set(as_json["rankings"]) == {"self_influence", "loss"}
    assert as_json["estimated_flips"] is None and {c["flagged"] for c in as_json["candidates"]} == {None}


def test_with_signals_ranks_by_the_default_and_keeps_every_named_ranking():
    model, data = _problem()
    recorder = train_recording_signals(model, data)
    report = find_mislabel_candidates(model, cross_entropy_per_example, data,
                                      ProblemConfig(solver=LowRankConfig(rank=8), damping=0.1), None, recorder=recorder)
    assert report.ranking == "el2n_separated" and report.signals["epochs"] == [0, 1, 2]
    assert len(report.candidates) == len(data)  # None: the whole training set
    expected = torch.argsort(recorder.scores(), descending=True, stable=True).tolist()
    assert [c.train_index for c in report.candidates] == expected
    assert [c.score for c in report.candidates] == sorted((c.score for c in report.candidates), reverse=True)
    suggested = recorder.suggested_labels()
    assert all(c.suggested_label == int(suggested[c.train_index]) != c.label for c in report.candidates)
    assert all(c.input is not None for c in report.candidates)  # tabular rows: every candidate keeps its input
    rankings = mislabel_to_dict(report)["rankings"]
    assert {"self_influence", "loss", "el2n_weighted", "el2n_window", "aum", "final_margin"} <= set(rankings)
    assert all(sorted(order) == list(range(len(data))) for order in rankings.values())
    assert len(set(expected[:6]) & set(range(6))) >= 4  # the planted flips rank high
    as_json = mislabel_to_dict(report)
    estimated = as_json["estimated_flips"]
    assert estimated["method"] == "confident_joint" and estimated["low"] <= estimated["estimate"] <= estimated["high"]
    flags = [c["flagged"] for c in as_json["candidates"]]
    assert flags == [True] * estimated["flagged"] + [False] * (len(flags) - estimated["flagged"])
    assert estimated["flagged"] == round(estimated["estimate"])
    assert "Estimated wrong labels" in mislabel_markdown(report)
    writer = _Scalars()
    write_mislabel_report(writer, report)
    assert writer.scalars["influence/mislabel/estimated_flips"] == pytest.approx(estimated["estimate"])
    assert writer.scalars["influence/mislabel/flagged"] == estimated["flagged"]
    assert writer.scalars["influence/mislabel/plausible_flips_low"] == pytest.approx(estimated["plausible_low"])
    assert writer.scalars["influence/mislabel/plausible_flips_high"] == pytest.approx(estimated["plausible_high"])
    assert "plausible range" in mislabel_markdown(report)


class _TinyConvNet(torch.nn.Module):
    """Logistic regression on 40x40 single-channel images (inputs larger than a thumbnail)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1600, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_every_candidate_past_the_shown_ones_has_a_small_thumbnail_in_the_report():
    from lightning_influence.config import MISLABEL_SHOWN
    from lightning_influence.core.tensors.batching import THUMBNAIL_SIDE
    from lightning_influence.dashboard.views import candidate_rows

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(90, 1, 40, 40, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (90,), generator=generator)
    torch.manual_seed(0)
    model = _TinyConvNet().double()
    data = IndexedData(torch.utils.data.TensorDataset(x, y), None, 32)
    report = find_mislabel_candidates(model, cross_entropy_per_example, data,
                                      ProblemConfig(solver=LowRankConfig(rank=4), damping=0.1), None)
    assert len(report.candidates) == 90 > MISLABEL_SHOWN
    shown, rest = report.candidates[:MISLABEL_SHOWN], report.candidates[MISLABEL_SHOWN:]
    assert all(torch.equal(c.input, x[c.train_index]) for c in shown)  # the grid's inputs, as before
    for c in rest:  # a thumbnail: the pooled image, min-max scaled to uint8
        assert c.input.dtype == torch.uint8 and tuple(c.input.shape) == (1, THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x[c.train_index][None].float(), THUMBNAIL_SIDE)[0]
        scaled = (pooled - pooled.min()) / (pooled.max() - pooled.min()) * 255
        assert (c.input.double() - scaled.double()).abs().max() <= 0.5 + 1e-3
    as_json = mislabel_to_dict(report)
    train = as_json["examples"]["train"]
    assert sorted(map(int, train)) == sorted(c.train_index for c in report.candidates)  # once per example
    assert all(entry["input"]["kind"] == "image" for entry in train.values())
    assert {tuple(train[str(c.train_index)]["input"]["shape"]) for c in rest} == {(1, THUMBNAIL_SIDE, THUMBNAIL_SIDE)}
    size = len(json.dumps({str(c.train_index): train[str(c.train_index)] for c in rest}))
    assert size < 2_000 * len(rest)  # small: under 2 kB of JSON per thumbnail of 32 x 32 noise
    rows = candidate_rows(json.loads(json.dumps(as_json)))
    assert all(row["rendered"] and row["input"]["png"] for row in rows)  # the dashboard shows each candidate
