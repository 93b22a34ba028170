"""``benchmarks/scale.py``'s bookkeeping: the stages of the self-check and of the residual verdict land in their own
groups, and a run stopped by ``--stop-after`` keeps its stages (its analysis time a lower bound)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_stages_have_their_own_groups(scale):
    assert scale.group_of("self_check/retraining") == "self-check retraining"
    assert scale.group_of("self_check/candidates/whole_set_product") == "self-check solves"
    assert scale.group_of("self_check/candidates/whole_set_product/damping_estimate") == "self-check solves"
    assert scale.group_of("recursion/residual") == "residual verdict"
    assert scale.group_of("recursion/whole_set_product") == "recursion"
    assert scale.group_of("self_influence/lanczos") == "self-influence setup"
    assert scale.group_of("recursion/damping_estimate") == "damping estimate"


def test_a_stopped_run_keeps_its_stages_and_residual_counts_in_s_test(scale):
    row = {"model": "cnn", "n_train": 1000, "measured": False, "partial": True, "epoch_seconds": 2.0,
           "analysis_seconds": 100.0, "train_peak_rss_mib": 500.0, "analysis_peak_rss_mib": 1000.0,
           "stages": {"recursion": 50.0, "recursion/residual": 20.0, "self_check/retraining": 10.0}}
    scale.add_groups(row)
    assert row["groups"]["recursion"] == 50.0 and row["groups"]["residual verdict"] == 20.0
    assert row["groups"]["self-check retraining"] == 10.0 and row["groups"]["other"] == 20.0
    assert row["s_test_seconds"] == 70.0  # the verdict is part of the solve
    assert row["analysis_over_epoch"] == 50.0 and row["memory_ratio"] == 2.0
    assert "reports_mib" not in row  # no report was written


def test_the_sampled_verdict_is_a_fixed_stage_in_the_extrapolation(scale):
    groups = dict.fromkeys(scale.GROUPS, 1.0)
    groups.update({"residual verdict": 30.0, "scoring": 10.0})
    row = {"model": "cnn", "n_train": 10000, "params": 1, "measured": True, "epoch_seconds": 20.0,
           "analysis_seconds": sum(groups.values()), "train_peak_rss_mib": 700.0, "analysis_peak_rss_mib": 900.0,
           "groups": groups}
    far = scale.extrapolate("cnn", 50000, [row])
    assert far["groups"]["residual verdict"] == 30.0  # a sample decided at the same size, whatever N
    assert far["groups"]["scoring"] == pytest.approx(50.0) and far["epoch_seconds"] == pytest.approx(100.0)


def test_growth_benchmark_times_each_size_and_checks_the_ratios_of_its_minima():
    spec = importlib.util.spec_from_file_location("scale_growth_benchmark", ROOT / "benchmarks" / "scale_growth.py")
    growth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(growth)
    result = growth.measure("mlp", [256, 512], train_on=256, repeats=2, scoring_only=False)
    small, large = result["rows"]
    assert [small["n_train"], large["n_train"]] == [256, 512] and result["params"] > 0
    for row in result["rows"]:
        assert len(row["s_test"]["seconds"]) == len(row["scoring"]["seconds"]) == 2
        assert row["s_test"]["min"] == min(row["s_test"]["seconds"]) > 0 and row["s_test"]["damping"] > 0
    checks = result["checks"]
    assert checks["s_test_ratio"] == large["s_test"]["min"] / small["s_test"]["min"]
    assert checks["scoring_per_example_ratio"] == (large["scoring"]["min"] / 512) / (small["scoring"]["min"] / 256)
    assert checks["s_test_within_20_percent"] == (abs(checks["s_test_ratio"] - 1) <= 0.2)
