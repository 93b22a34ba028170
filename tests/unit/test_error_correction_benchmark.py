"""The verdicts and tables of ``benchmarks/error_correction.py`` (#28) on hand-made results with a known answer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its tasks module by name
    spec = importlib.util.spec_from_file_location("benchmarks_error_correction", ROOT / "benchmarks" / "error_correction.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_error_correction"] = module
    spec.loader.exec_module(module)
    return module


def _row(before: float, after: float, others_before: float, others_after: float) -> dict:
    return {"slice_before": before, "slice_after": after, "others_before": others_before, "others_after": others_after}


def test_summary_is_the_mean_over_seeds_in_points_and_counts_failures(bench):
    rows = [_row(0.2, 0.9, 0.95, 0.90), _row(0.4, 0.8, 0.97, 0.98), {"failed": "CG met negative curvature"}]
    s = bench.summary(rows)
    assert s["slice_gain_per_seed"] == [70.0, 40.0] and s["slice_gain"] == 55.0
    assert s["cost_outside_per_seed"] == [5.0, -1.0] and s["cost_outside"] == 2.0
    assert s["failed"] == 1 and bench.summary([{"failed": "x"}]) == {"failed": 1}


def _table(default: tuple[float, float], anchors: tuple[float, float]) -> dict:
    """One lr's summaries: (slice_after, cost) for default and anchors; helpful, random, harmful fixed."""
    def cell(after, cost):
        return {"slice_after": after, "slice_gain": after - 20.0, "cost_outside": cost}
    return {"default": cell(*default), "anchors": cell(*anchors), "helpful": cell(60.0, 1.0),
            "random": cell(21.0, 0.0), "harmful": cell(5.0, 0.5)}


@pytest.mark.parametrize(("default", "anchors", "gain", "cost"), [
    ((90.0, 3.0), (90.0, 6.0), True, True),      # same gain, exactly half the cost
    ((89.9, 0.0), (90.0, 6.0), False, True),     # a hair less gain
    ((95.0, 3.1), (90.0, 6.0), True, False),     # more than half the cost
    ((95.0, 0.0), (90.0, -1.0), True, True),     # anchors cost nothing: the default may cost nothing either
    ((95.0, 0.5), (90.0, -1.0), True, False),
])
def test_goals_compare_the_default_with_anchors_at_the_automatic_lr(bench, default, anchors, gain, cost):
    tables = {"task": {"auto/3": _table((10.0, 9.0), (99.0, 0.0)), "auto": _table(default, anchors),
                       "auto*3": _table((50.0, 0.0), (50.0, 0.0))}}
    verdict = bench.goals(tables)["task"]
    assert verdict["gain_at_least_anchors"] is gain and verdict["cost_at_most_half_of_anchors"] is cost
    assert verdict["helpful_above_random_and_harmful_every_lr"] is True
    assert verdict["default_above_random_and_harmful_every_lr"] is False  # 10.0 at auto/3: below random's 21.0


def test_markdown_prints_the_files_tables_and_verdicts(bench, tmp_path):
    tables = {"task": {"auto": {**_table((90.0, 3.0), (90.0, 6.0)), "anchors+random": {"failed": 3}}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"tables": tables, "automatic_lr": {"task": [0.1, 0.0316]},
                                "goals": bench.goals(tables)}))
    text = bench.markdown(path)
    assert "**task** (automatic lr per seed: 0.1, 0.0316)" in text
    assert "| default | 70.0 / 3.0 |" in text and "| anchors+random | failed |" in text
    assert "| default's slice gain >= anchors' | yes |" in text
    assert "| default's cost <= half of anchors' (or none) | yes |" in text


def test_update_replaces_only_the_remeasured_selections_and_recomputes_the_goals(bench, tmp_path):
    old = {"auto": _table((60.0, 1.0), (90.0, 6.0))}
    main = tmp_path / "main.json"
    main.write_text(json.dumps({"tables": {"task": old}, "automatic_lr": {"task": [0.1]},
                                "results": {"task": {"auto": {s: [{"old": s}] for s in old["auto"]}}},
                                "goals": bench.goals({"task": old}), "total": {"cpu_seconds": 9}}))
    new_default = {"slice_after": 95.0, "slice_gain": 75.0, "cost_outside": 2.0}
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"tables": {"task": {"auto": {"default": new_default}}}, "automatic_lr": {"task": [0.1]},
                                "results": {"task": {"auto": {"default": [{"new": 1}]}}},
                                "settings": {"tasks": ["task"], "selections": ["default"]},
                                "total": {"cpu_seconds": 5, "wall_seconds": 7}}))
    assert bench.goals({"task": old})["task"]["gain_at_least_anchors"] is False
    bench.update(main, [part], "re-measured")
    data = json.loads(main.read_text())
    assert data["tables"]["task"]["auto"]["default"] == new_default
    assert data["results"]["task"]["auto"]["default"] == [{"new": 1}]
    assert data["results"]["task"]["auto"]["anchors"] == [{"old": "anchors"}]  # kept
    assert data["goals"]["task"]["gain_at_least_anchors"] is True  # 75 >= 70, recomputed
    assert data["updates"][0]["note"] == "re-measured" and data["updates"][0]["cpu_seconds"] == 5
    part.write_text(part.read_text().replace('"task": [0.1]', '"task": [0.3]'))
    with pytest.raises(SystemExit, match="automatic lr"):  # other trained weights: refuse to mix
        bench.update(main, [part], "x")


def test_versus_anchors_judges_each_variant_against_fine_tuning_on_the_anchors(bench):
    tables = {"task": {"anchors": {"slice_gain": 70.0, "cost_outside": 8.0},
                       "good": {"slice_gain": 70.0, "cost_outside": 4.0},
                       "costly": {"slice_gain": 75.0, "cost_outside": 4.1},
                       "weak": {"slice_gain": 69.9, "cost_outside": -1.0}}}
    verdicts = bench.versus_anchors(tables)["task"]
    assert set(verdicts) == {"good", "costly", "weak"}
    assert verdicts["good"] == {"gain_at_least_anchors": True, "cost_at_most_half_of_anchors": True}
    assert verdicts["costly"] == {"gain_at_least_anchors": True, "cost_at_most_half_of_anchors": False}
    assert verdicts["weak"] == {"gain_at_least_anchors": False, "cost_at_most_half_of_anchors": True}
