"""Exports of reports: JSON Schema, CSV/Parquet tables, the pytorch-influence-functions layout, `export` command."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest
import torch

from lightning_influence.cli import main
from lightning_influence.reporting import (
    ExplainedPoint,
    Influencer,
    InfluenceReport,
    MislabelCandidate,
    MislabelReport,
    SolverSummary,
    export,
    mislabel_to_dict,
    report_to_dict,
    write_report_files,
)

N_TRAIN = 50


def _report(seed: int = 0) -> tuple[dict, torch.Tensor]:
    records, scores = _records(seed)
    return report_to_dict(records), scores


def _records(seed: int = 0) -> tuple[InfluenceReport, torch.Tensor]:
    """A report whose top lists are the real top-3 of a random score matrix (2 points x 50 training examples)."""
    scores = torch.randn(2, N_TRAIN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    points = []
    for row, val_index in enumerate((7, 3)):
        harmful = scores[row].argsort(descending=True)[:3].tolist()
        helpful = scores[row].argsort()[:3].tolist()
        points.append(ExplainedPoint(
            val_index=val_index, label=torch.tensor(row), prediction=torch.tensor(row + 1), loss=1.5,
            harmful=tuple(Influencer(i, float(scores[row, i])) for i in harmful),
            helpful=tuple(Influencer(i, float(scores[row, i])) for i in helpful),
        ))
    solver = SolverSummary("lissa", damping=0.01, converged=True, seconds=0.5, scale=20.0, settings={"depth": 100})
    report = InfluenceReport(epoch=4, global_step=40, stage="fit_end", train_size=N_TRAIN, points=tuple(points),
                             solver=solver, timings={"s_test": 0.5, "scoring": 0.25})
    return report, scores


def _mislabel() -> dict:
    candidates = tuple(MislabelCandidate(train_index=i, self_influence=-10.0 + i, loss=2.0 - 0.1 * i, loss_rank=i,
                                         label=i % 10, prediction=(i + 1) % 10) for i in range(4))
    solver = SolverSummary("lowrank", damping=0.01, converged=True, seconds=0.2, settings={"rank": 8})
    return mislabel_to_dict(MislabelReport(1, 10, N_TRAIN, candidates, solver, 0.3))


def test_reports_validate_against_the_shipped_schemas_and_broken_ones_do_not():
    report, _ = _report()
    jsonschema.validate(report, export.report_schema("influence"))
    jsonschema.validate(_mislabel(), export.report_schema("mislabel"))
    broken = json.loads(json.dumps(report))
    broken["points"][0]["harmful"][0] = [1.5, "high"]  # a pair must be [int train_index, number]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, export.report_schema("influence"))
    del broken["sign_convention"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, export.report_schema("influence"))
    with pytest.raises(ValueError, match="'influence' or 'mislabel'"):
        export.report_schema("trust")


def test_influence_rows_are_the_long_layout_with_the_loss_change_estimate():
    report, scores = _report()
    rows = export.influence_rows(report)
    assert len(rows) == 2 * 2 * 3
    for row in rows:
        position = [p["val_index"] for p in report["points"]].index(row["val_index"])
        assert row["influence"] == pytest.approx(float(scores[position, row["train_index"]]))
        assert row["loss_change_if_removed"] == pytest.approx(-row["influence"] / N_TRAIN)
    harmful = [r["influence"] for r in rows if r["val_index"] == 7 and r["kind"] == "harmful"]
    assert harmful == sorted(harmful, reverse=True) and [r["rank"] for r in rows[:3]] == [1, 2, 3]  # 1-based (#27)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_round_trip(tmp_path, suffix):
    pandas = pytest.importorskip("pandas")
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    report, _ = _report()
    path = export.export_table(report, tmp_path / f"top{suffix}")
    frame = pandas.read_csv(path) if suffix == ".csv" else pandas.read_parquet(path)
    expected = pandas.DataFrame(export.influence_rows(report))
    assert list(frame.columns) == list(expected.columns) and len(frame) == 12
    pandas.testing.assert_series_equal(frame["influence"], expected["influence"])
    assert frame["train_index"].tolist() == expected["train_index"].tolist()
    mislabel = export.export_table(_mislabel(), tmp_path / f"mislabel{suffix}")
    frame = pandas.read_csv(mislabel) if suffix == ".csv" else pandas.read_parquet(mislabel)
    assert frame["train_index"].tolist() == [0, 1, 2, 3] and frame["rank"].tolist() == [1, 2, 3, 4]
    assert frame["loss_rank"].tolist() == [1, 2, 3, 4]  # 1-based like the console (the JSON's are 0-based)


def test_missing_pandas_or_pyarrow_gives_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    report, _ = _report()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" or
                        name == "fastparquet" else real(name, *a))
    with pytest.raises(ImportError, match="pip install pyarrow"):
        export.export_table(report, tmp_path / "top.parquet")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pandas" else real(name, *a))
    with pytest.raises(ImportError, match="pip install pandas"):
        export.export_table(report, tmp_path / "top.csv")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_pytorch_influence_functions_layout(tmp_path):
    report, scores = _report()
    layout = export.pytorch_influence_functions_layout(report, scores)
    assert list(layout) == ["7", "3"]
    for position, (_key, entry) in enumerate(layout.items()):
        assert entry["num_in_dataset"] == position and entry["label"] == position
        assert entry["harmful"] == scores[position].argsort(descending=True)[:3].tolist()
        assert entry["helpful"] == scores[position].argsort()[:3].tolist()
        assert entry["harmful_influence"] == pytest.approx(scores[position].sort(descending=True).values[:3].tolist())
        assert entry["helpful_influence"] == pytest.approx(scores[position].sort().values[:3].tolist())
        assert entry["influence"] == pytest.approx(scores[position].tolist())
        assert "positive = harmful" in entry["sign_convention"]
    assert "influence" not in export.pytorch_influence_functions_layout(report)["7"]
    with pytest.raises(ValueError, match="n_points=2"):
        export.pytorch_influence_functions_layout(report, scores[:1])
    with pytest.raises(ValueError, match="mislabel report"):
        export.pytorch_influence_functions_layout(_mislabel())


def test_export_command_reads_files_written_by_the_reporting_layer(tmp_path):
    pytest.importorskip("pandas")
    records, scores = _records()
    json_path = write_report_files(tmp_path / "influence", records, scores)
    scores_path = tmp_path / "influence" / "epoch=4-scores.json"
    assert main(["export", str(json_path), "--table", str(tmp_path / "t.csv"), "--pif-json",
                 str(tmp_path / "pif.json"), "--scores", str(scores_path)]) == 0
    pif = json.loads((tmp_path / "pif.json").read_text())
    assert pif["7"]["influence"] == pytest.approx(scores[0].tolist())
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + 12

