"""The Influence dashboard's backend over HTTP: a real ``tensorboard`` on 127.0.0.1 serving real callback runs
(image, text and tabular), every route compared with the files the callback wrote."""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from importlib import import_module, resources
from pathlib import Path

import jsonschema
import pytest
import torch
from helpers.dashboard_runs import KINDS, fitted_runs

from lightning_influence.reporting import load_full_scores
from lightning_influence.reporting.export import report_schema
from lightning_influence.reporting.relabel import predicted_label

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from dashboard_server import declared_entry_points, running_dashboard, wait_for_scalars
from tensorboard_server import get_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNS = {kind: f"{kind}/version_0" for kind in KINDS}


@pytest.fixture(scope="module")
def server():
    root = fitted_runs()
    with running_dashboard(root) as url:
        yield root, url


def route(url: str, name: str, **params) -> object:
    return get_json(f"{url}/data/plugin/influence/{name}?{urllib.parse.urlencode(params)}")


def influence_dir(root: Path, kind: str) -> Path:
    return root / kind / "version_0" / "influence"


def read(root: Path, kind: str, name: str) -> dict:
    return json.loads((influence_dir(root, kind) / name).read_text())


def test_entry_point_names_the_plugin_and_the_frontend_ships_as_package_data():
    (value,) = declared_entry_points().values()
    module, attribute = value.split(":")
    plugin = getattr(import_module(module), attribute)
    assert plugin.plugin_name == "influence"
    static = resources.files("lightning_influence.dashboard").joinpath("static")
    assert "export async function render" in static.joinpath("index.js").read_text()
    assert static.joinpath("style.css").read_text().strip()


def test_plugins_listing_shows_an_influence_tab(server):
    _, url = server
    listing = get_json(f"{url}/data/plugins_listing")["influence"]
    assert listing["enabled"] is True and listing["tab_name"] == "Influence"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/influence/index.js"}
    with urllib.request.urlopen(f"{url}/data/plugin/influence/index.js", timeout=10) as response:
        assert "javascript" in response.headers["Content-Type"]


def test_runs_list_every_analysis_and_mislabel_report(server):
    root, url = server
    runs = {r["run"]: r for r in route(url, "runs")["runs"]}
    assert set(runs) == set(RUNS.values())
    for kind, name in RUNS.items():
        epochs = sorted(int(p.stem.split("=")[1]) for p in influence_dir(root, kind).glob("epoch=*.json")
                        if not p.name.endswith("-scores.json"))
        assert [a["epoch"] for a in runs[name]["analyses"]] == epochs == [0, 1]
        for analysis in runs[name]["analyses"]:
            report = read(root, kind, f"epoch={analysis['epoch']}.json")
            assert (analysis["global_step"], analysis["stage"], analysis["points"]) == (
                report["global_step"], report["stage"], len(report["points"]))
        assert runs[name]["mislabel"] == [0, 1]
    assert runs[RUNS["image"]]["analyses"][0]["has_scores"] and not runs[RUNS["text"]]["analyses"][0]["has_scores"]


@pytest.mark.parametrize("kind", KINDS)
def test_points_are_sorted_by_loss_with_their_renderings(server, kind):
    root, url = server
    report = read(root, kind, "epoch=1.json")
    page = route(url, "points", run=RUNS[kind], epoch=1)
    expected = sorted(report["points"], key=lambda p: -p["loss"])
    assert [p["val_index"] for p in page["points"]] == [p["val_index"] for p in expected]
    assert [(p["label"], p["prediction"], p["loss"]) for p in page["points"]] == [
        (p["label"], p["prediction"], p["loss"]) for p in expected]
    residuals = {p["val_index"]: p["residual"] for p in report["trust"]["points"]}
    assert all(p["trust"]["residual"] == residuals[p["val_index"]] for p in page["points"])
    rendering = page["points"][0]["input"]
    if kind == "image":
        assert rendering["kind"] == "image" and rendering["shape"] == [1, 8, 8]
        assert base64.b64decode(rendering["png"]).startswith(PNG_MAGIC)
    else:
        assert rendering["kind"] == "values" and not rendering["truncated"]
        assert len(rendering["values"]) == (12 if kind == "text" else 10)
        assert all(isinstance(v, int) for v in rendering["values"]) == (kind == "text")  # token ids vs features
    second = route(url, "points", run=RUNS[kind], epoch=1, offset=1, limit=1)
    assert second["total"] == len(expected) and [p["val_index"] for p in second["points"]] == [expected[1]["val_index"]]


@pytest.mark.parametrize("kind", KINDS)
def test_point_lists_the_reported_training_examples(server, kind):
    root, url = server
    report = read(root, kind, "epoch=1.json")
    jsonschema.validate(report, report_schema("influence"))  # the renderings are an additive `examples` object
    jsonschema.validate(read(root, kind, "mislabel_epoch=1.json"), report_schema("mislabel"))
    examples = report["examples"]
    assert set(examples["val"]) == {str(p["val_index"]) for p in report["points"]}
    for point in report["points"]:
        detail = route(url, "point", run=RUNS[kind], epoch=1, val_index=point["val_index"])
        for side in ("harmful", "helpful"):
            assert [[e["train_index"], e["influence"]] for e in detail[side]] == point[side]
            for entry in detail[side]:
                stored = examples["train"][str(entry["train_index"])]
                assert (entry["label"], entry["prediction"], entry["input"]) == (
                    stored["label"], stored["prediction"], stored["input"])
                assert entry["loss_change_if_removed"] == pytest.approx(-entry["influence"] / report["train_size"])
        assert all(e["influence"] > 0 for e in detail["harmful"]) and all(e["influence"] < 0 for e in detail["helpful"])


def test_histogram_and_example_column_come_from_the_score_shards(server):
    root, url = server
    val_indices, scores = load_full_scores(influence_dir(root, "image") / "epoch=1-scores.json")
    row = scores[0]
    histogram = route(url, "point", run=RUNS["image"], epoch=1, val_index=val_indices[0])["histogram"]
    assert sum(histogram["counts"]) == histogram["scored"] == int(torch.isfinite(row).sum()) == 200
    assert (histogram["min"], histogram["max"]) == pytest.approx((float(row.min()), float(row.max())))
    example = route(url, "example", run=RUNS["image"], epoch=1, train_index=17)  # in no top list, still scored
    assert example["source"] == "full scores"
    assert {p["val_index"]: p["influence"] for p in example["points"]} == pytest.approx(
        dict(zip(val_indices, scores[:, 17].tolist())))
    assert [p["influence"] for p in example["points"]] == sorted((p["influence"] for p in example["points"]), reverse=True)


def test_cross_point_view_counts_harmful_lists(server):
    root, url = server
    report = read(root, "text", "epoch=1.json")
    page = route(url, "influencers", run=RUNS["text"], epoch=1, limit=500)
    harmful: dict[int, int] = {}
    for point in report["points"]:
        for index, _ in point["harmful"]:
            harmful[index] = harmful.get(index, 0) + 1
    assert {e["train_index"]: e["harmful_count"] for e in page["examples"] if e["harmful_count"]} == harmful
    counts = [e["harmful_count"] for e in page["examples"]]
    assert counts == sorted(counts, reverse=True)
    top = page["examples"][0]
    example = route(url, "example", run=RUNS["text"], epoch=1, train_index=top["train_index"])
    assert example["source"] == "top lists" and example["harmful_count"] == top["harmful_count"]
    assert sorted(p["val_index"] for p in example["points"] if p["kind"] == "harmful") == sorted(top["harmful_points"])
    paged = route(url, "influencers", run=RUNS["text"], epoch=1, offset=2, limit=3)["examples"]
    assert [e["train_index"] for e in paged] == [e["train_index"] for e in page["examples"][2:5]]


def test_epoch_comparison_follows_one_point(server):
    root, url = server
    reports = [read(root, "tabular", f"epoch={e}.json") for e in (0, 1)]
    common = {p["val_index"] for p in reports[0]["points"]} & {p["val_index"] for p in reports[1]["points"]}
    val_index = min(common)
    history = route(url, "compare", run=RUNS["tabular"], val_index=val_index)["analyses"]
    assert [a["epoch"] for a in history] == [0, 1]
    lists = [next(p for p in r["points"] if p["val_index"] == val_index) for r in reports]
    assert [a["harmful"] for a in history] == [p["harmful"] for p in lists]
    kept = {i for i, _ in lists[0]["harmful"]} & {i for i, _ in lists[1]["harmful"]}
    assert history[1]["harmful_kept"] == len(kept)
    assert history[1]["harmful_new"] == sorted({i for i, _ in lists[1]["harmful"]} - kept)


@pytest.mark.parametrize("kind", KINDS)
def test_mislabel_candidates_confusion_and_relabel_csv(server, kind):
    root, url = server
    report = read(root, kind, "mislabel_epoch=1.json")
    page = route(url, "mislabel", run=RUNS[kind], epoch=1)
    assert [c["train_index"] for c in page["candidates"]] == [c["train_index"] for c in report["candidates"]]
    assert [c["self_influence"] for c in page["candidates"]] == [c["self_influence"] for c in report["candidates"]]
    assert [c["rank"] for c in page["candidates"]] == list(range(1, len(report["candidates"]) + 1))  # 1-based
    assert [c["loss_rank"] for c in page["candidates"]] == [c["loss_rank"] + 1 for c in report["candidates"]]
    assert page["ranking"] == report["ranking"] and page["ranking_definition"] == report["ranking_definition"]
    assert page["estimated_flips"] == report.get("estimated_flips")  # the count of wrong labels, as written
    assert [c["flagged"] for c in page["candidates"]] == [c.get("flagged") for c in report["candidates"]]
    for table, field in ((page["confusion"], "prediction"), (page["suggestions"], "suggested_label")):
        labels = table["labels"]  # given vs the model's own prediction; given vs the suggested label
        for given in labels:
            for other in labels:
                expected = sum(str(c["label"]) == given and str(c[field]) == other for c in report["candidates"])
                assert table["counts"][labels.index(given)][labels.index(other)] == expected
    chosen = [c["train_index"] for c in report["candidates"][:3]]
    query = urllib.parse.urlencode({"run": RUNS[kind], "epoch": 1, "train_indices": ",".join(map(str, chosen))})
    with urllib.request.urlopen(f"{url}/data/plugin/influence/relabel.csv?{query}", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/csv")
        assert 'attachment; filename="relabel_epoch=1.csv"' == response.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(response.read().decode())))
    assert [int(r["train_index"]) for r in rows] == chosen
    for row, candidate in zip(rows, report["candidates"]):
        suggested = predicted_label(candidate)  # the training signals' suggested label (recorded during the fit)
        assert int(row["rank"]) == report["candidates"].index(candidate) + 1
        assert (row["given_label"], row["predicted_label"], row["new_label"]) == (
            str(candidate["label"]), str(suggested), str(suggested))
        assert float(row["self_influence"]) == pytest.approx(candidate["self_influence"])


def test_trust_route_holds_the_diagnosis_and_the_solver_trace(server):
    root, url = server
    report = read(root, "image", "epoch=1.json")
    wait_for_scalars(url, RUNS["image"], "influence/cg_trace/epoch_1/")
    trust = route(url, "trust", run=RUNS["image"], epoch=1)
    assert trust["warnings"] == report["trust"]["warnings"]
    assert [(p["val_index"], p["residual"]) for p in trust["points"]] == [
        (p["val_index"], p["residual"]) for p in report["trust"]["points"]]
    assert trust["model"]["gradient_ratio"] == report["trust"]["gradient_ratio"]
    assert trust["solver"] == report["solver"]
    tag = "influence/cg_trace/epoch_1/repeat_0"
    scalars = get_json(f"{url}/data/plugin/scalars/scalars?{urllib.parse.urlencode({'run': RUNS['image'], 'tag': tag})}")
    assert trust["traces"]["repeat_0"] == [[step, pytest.approx(value)] for _, step, value in scalars]
    assert trust["traces"]["repeat_0"][0][0] == 1


@pytest.mark.parametrize("name, params, message", [
    ("points", {"epoch": 1}, "Expected a `run` parameter"),
    ("points", {"run": "nope", "epoch": 1}, "Unknown run 'nope'"),
    ("points", {"run": RUNS["image"]}, "Expected an integer `epoch` parameter"),
    ("points", {"run": RUNS["image"], "epoch": "one"}, "Expected `epoch` to be an integer, but got 'one'"),
    ("points", {"run": RUNS["image"], "epoch": 7}, "has no analysis at epoch 7"),
    ("points", {"run": RUNS["image"], "epoch": 1, "limit": 0}, "Expected `limit` to be an integer in [1, 500]"),
    ("points", {"run": RUNS["image"], "epoch": 1, "offset": -1}, "Expected `offset` to be an integer >= 0"),
    ("point", {"run": RUNS["image"], "epoch": 1, "val_index": 999}, "Validation point 999 is not in run"),
    ("example", {"run": RUNS["image"], "epoch": 1, "train_index": 200}, "Expected `train_index` in [0, 200)"),
    ("compare", {"run": RUNS["image"], "val_index": 999}, "Validation point 999 is in no analysis"),
    ("mislabel", {"run": RUNS["image"], "epoch": 5}, "has no mislabel report at epoch 5"),
    ("relabel.csv", {"run": RUNS["image"], "epoch": 1, "train_indices": "x"}, "comma-separated training indices"),
    ("relabel.csv", {"run": RUNS["image"], "epoch": 1, "train_indices": "199999"}, "are not mislabel candidates"),
    ("trust", {"run": RUNS["image"], "epoch": -1}, "Expected `epoch` to be an integer >= 0"),
])
def test_bad_parameters_get_400_with_a_message(server, name, params, message):
    _, url = server
    with pytest.raises(urllib.error.HTTPError) as error:
        route(url, name, **params)
    assert error.value.code == 400 and error.value.headers["Content-Type"].startswith("application/json")
    body = json.loads(error.value.read().decode())
    assert message in body["error"] and body["status"] == 400


def test_trust_route_reports_lissa_repeat_agreement_and_one_trace_per_repeat(server):
    root, url = server
    report = read(root, "tabular", "epoch=1.json")
    wait_for_scalars(url, RUNS["tabular"], "influence/lissa_trace/epoch_1/")
    trust = route(url, "trust", run=RUNS["tabular"], epoch=1)
    assert trust["solver"]["solver"] == "lissa" and trust["solver"]["settings"]["repeats"] == 2
    assert [(p["repeat_pearson"], p["repeat_spearman"]) for p in trust["points"]] == [
        (p["repeat_pearson"], p["repeat_spearman"]) for p in report["trust"]["points"]]
    assert all(p["repeat_spearman"] is not None for p in trust["points"])
    assert sorted(trust["traces"]) == ["repeat_0", "repeat_1"]
    assert [w["code"] for w in trust["warnings"]] == [w["code"] for w in report["trust"]["warnings"]]
