"""The count checks of ``benchmarks/mislabel.py`` on made-up runs, and its reference agreement on known noise (#30)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmarks_mislabel", ROOT / "benchmarks" / "mislabel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_mislabel"] = module
    spec.loader.exec_module(module)
    return module


def _run(ratio: float, low: float, high: float) -> dict:
    metric = {"auroc": 0.9, "recall@10%": 0.5, "recall@k": 0.5}
    peers = ("loss", "final_margin", "early_el2n_dense", "aum_dense", "forgetting_dense", "cleanlab")
    return {"metrics": {name: dict(metric) for name in ("el2n_separated", *peers)},
            "count": {"true": 100, "estimate": 100 * ratio, "ratio": ratio, "covered": True, "flagged": 90,
                      "flagged_precision": 0.9, "flagged_recall": 0.8, "cleanlab": 100, "cleanlab_ratio": 1.0,
                      "plausible_low": low, "plausible_high": high, "plausible_covers": low <= 1 <= high,
                      "methods": {"confident_joint": ratio}},
            "cost": {"callback_signals": 0.1, "dense_signals": 0.5, "cleanlab": 3.0}}


def test_count_split_counts_the_settings_of_the_chosen_and_the_other_models(bench):
    runs = {"lr/asym10": [_run(1.0, 0.9, 1.5)] * 3,  # estimate within 20%, range covers
            "mlp/hard10": [_run(0.1, 0.05, 3.0)] * 3,  # estimate off, range covers
            "cnn/asym10": [_run(1.1, 1.05, 2.0), _run(1.0, 0.9, 1.2), _run(1.0, 0.9, 1.2)],  # one seed missed
            "text/hard30": [_run(0.5, 0.3, 0.8)] * 3}  # neither
    results = {key: {"runs": entry, **bench.summarise(entry)} for key, entry in runs.items()}
    assert results["cnn/asym10"]["count"]["plausible_covered"] == 2
    assert results["cnn/asym10"]["count"]["plausible_range"] == pytest.approx([2.85 / 3, 4.4 / 3])
    checks = bench.checks(results)
    assert checks["all"]["count_within_20pct"] == 2 and checks["all"]["plausible_range_covers"] == 2
    assert checks["count_split"]["chosen_on"] == {"models": ["lr", "mlp"], "settings": 2, "count_within_20pct": 1,
                                                  "plausible_range_covers": 2}
    assert checks["count_split"]["checked_on"] == {"models": ["cnn", "text"], "settings": 2,
                                                   "count_within_20pct": 1, "plausible_range_covers": 0}


def test_reference_agreement_counts_hard_flips_to_the_reference_prediction(bench):
    # hard flips move the least sure examples to the reference's runner-up: those the reference got wrong
    # (its top class is the runner-up of the true one) end with the label it predicts; uniform flips hardly do
    x, y_true = bench.digits_split(0)
    probs = bench.reference_probabilities(x.numpy(), y_true, 0)
    others = probs.scatter(1, y_true[:, None], -1.0)
    wrong = probs.argmax(dim=1) != y_true
    margin = probs.gather(1, y_true[:, None]).squeeze(1) - others.amax(dim=1)
    lowest = torch.argsort(margin, stable=True)[:100]
    assert bench.reference_agreement("mlp", "hard10", 0) == int(wrong[lowest].sum()) > 20
    assert bench.reference_agreement("lr", "uniform10", 0) <= 3
