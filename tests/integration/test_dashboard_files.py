"""The Influence dashboard over HTTP on files that break things, and on runs of the shipped examples.

Broken files (``tests/helpers/dashboard_broken.py``): every route still answers JSON, the bad file is named with
its reason, and everything else keeps working. Example runs (``examples/digits.py`` and
``examples/text_classification.py``, one epoch each): text, mislabel ranking and sorting/filtering.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers.dashboard_broken import CASES, broken_runs
from helpers.dashboard_runs import example_runs, fitted_runs

from lightning_influence.analysis.training_signals import DEFAULT_SCORE
from lightning_influence.dashboard.views import trust_by_point

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from dashboard_server import running_dashboard


def _strict(text: str):
    def reject(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=reject)


def call(url: str, name: str, **params):
    """``(status, JSON body)`` of one route; the body must be strict JSON whatever the status."""
    request = f"{url}/data/plugin/influence/{name}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["Content-Type"].startswith("application/json")
            return response.status, _strict(response.read().decode())
    except urllib.error.HTTPError as error:
        assert error.headers["Content-Type"].startswith("application/json"), error.read()[:200]
        return error.code, _strict(error.read().decode())


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = broken_runs(fitted_runs() / "image" / "version_0", tmp_path_factory.mktemp("broken"))
    with running_dashboard(root) as url:
        yield root, url


@pytest.fixture(scope="module")
def examples():
    root = example_runs()
    with running_dashboard(root) as url:
        yield root, url


def test_runs_lists_unreadable_files_and_keeps_the_rest(broken):
    root, url = broken
    status, answer = call(url, "runs")
    assert status == 200
    runs = {r["run"].split("/")[0]: r for r in answer["runs"]}
    assert set(runs) == {"good", *CASES}
    assert [a["epoch"] for a in runs["good"]["analyses"]] == [0, 1] and runs["good"]["mislabel"] == [0, 1]
    assert [a["epoch"] for a in runs["truncated"]["analyses"]] == [0]  # epoch 1 skipped, epoch 0 kept
    assert runs["bad_mislabel"]["mislabel"] == [0]
    reasons = {Path(u["path"]).parent.parent.parent.name + "/" + Path(u["path"]).name: u["reason"]
               for u in answer["unreadable"]}
    assert set(reasons) == {"truncated/epoch=1.json", "not_an_object/epoch=1.json", "bad_mislabel/mislabel_epoch=1.json"}
    assert "truncated" in reasons["truncated/epoch=1.json"]
    assert "JSON list" in reasons["not_an_object/epoch=1.json"]
    assert all(u["hint"] for u in answer["unreadable"])
    assert [a["global_step"] for a in runs["no_global_step"]["analyses"]] == [None, None]
    assert runs["mislabel_only"]["analyses"] == [] and runs["mislabel_only"]["mislabel"] == [0, 1]


@pytest.mark.parametrize("run, route, params", [
    ("truncated", "points", {"epoch": 1}), ("truncated", "point", {"epoch": 1, "val_index": 0}),
    ("not_an_object", "trust", {"epoch": 1}), ("bad_mislabel", "mislabel", {"epoch": 1}),
])
def test_an_unreadable_report_gets_422_json_naming_the_file(broken, run, route, params):
    _, url = broken
    status, body = call(url, route, run=f"{run}/version_0", **params)
    assert status == 422
    assert "Cannot read" in body["error"] and ("epoch=1.json" in body["error"]) and body["hint"]


def test_the_readable_parts_of_a_run_with_a_bad_file_still_answer(broken):
    _, url = broken
    assert call(url, "points", run="truncated/version_0", epoch=0)[0] == 200
    status, history = call(url, "compare", run="truncated/version_0",
                           val_index=call(url, "points", run="truncated/version_0", epoch=0)[1]["points"][0]["val_index"])
    assert status == 200 and [a["epoch"] for a in history["analyses"]] == [0]
    assert [s["epoch"] for s in history["skipped"]] == [1]
    assert call(url, "mislabel", run="bad_mislabel/version_0", epoch=0)[0] == 200


def test_missing_keys_nan_and_zero_points_are_shown_not_crashed(broken):
    root, url = broken
    status, page = call(url, "points", run="no_global_step/version_0", epoch=1)
    assert status == 200 and page["global_step"] is None and page["total"] > 0
    status, page = call(url, "points", run="nan/version_0", epoch=1)
    first = json.loads((root / "nan" / "version_0" / "influence" / "epoch=1.json").read_text())["points"][0]
    row = next(p for p in page["points"] if p["val_index"] == first["val_index"])
    assert status == 200 and row["loss"] is None
    status, detail = call(url, "point", run="nan/version_0", epoch=1, val_index=first["val_index"])
    assert status == 200 and detail["harmful"][0]["influence"] is None and detail["loss"] is None
    status, page = call(url, "points", run="zero_points/version_0", epoch=1)
    assert status == 200 and page["total"] == page["all"] == 0
    assert call(url, "trust", run="zero_points/version_0", epoch=1)[1]["points"] == []


def test_a_missing_score_shard_costs_only_the_histogram(broken):
    root, url = broken
    val_index = call(url, "points", run="missing_shard/version_0", epoch=1)[1]["points"][0]["val_index"]
    status, detail = call(url, "point", run="missing_shard/version_0", epoch=1, val_index=val_index)
    assert status == 200 and detail["histogram"] is None and len(detail["harmful"]) > 0
    assert "missing" in detail["scores_error"]["error"] and "shared" in detail["scores_error"]["hint"]
    train_index = detail["harmful"][0]["train_index"]
    status, example = call(url, "example", run="missing_shard/version_0", epoch=1, train_index=train_index)
    assert status == 200 and example["source"] == "top lists" and example["scores_error"]
    assert any(p["val_index"] == val_index and p["kind"] == "harmful" for p in example["points"])
    good = call(url, "point", run="good/version_0", epoch=1, val_index=val_index)[1]
    assert good["histogram"] is not None and good["scores_error"] is None


def test_unknown_parameters_and_other_errors_are_json(broken):
    _, url = broken
    status, body = call(url, "points", run="good/version_0", epoch=1, sort="colour")
    assert status == 400 and "Expected `sort` to be one of" in body["error"]
    status, body = call(url, "mislabel", run="good/version_0", epoch=1, order="nope")
    assert status == 400 and "rankings" in body["error"]
    status, body = call(url, "relabel.csv", run="good/version_0", epoch=9, train_indices="1")
    assert status == 400 and "has no mislabel report at epoch 9" in body["error"]


def test_trust_badge_follows_the_reports_own_tolerance():
    def report(residual_tol, residual, warnings=()):
        return {"solver": {"residual_tol": residual_tol}, "points": [],
                "trust": {"points": [{"val_index": 3, "residual": residual}], "warnings": list(warnings)}}

    assert trust_by_point(report(0.05, 0.04))[3]["badge"] == "ok"
    assert trust_by_point(report(0.05, 0.2))[3]["badge"] == "poor"  # above 0.05: poor, though far below 0.5
    assert trust_by_point(report(0.5, 0.2))[3]["badge"] == "ok"
    warned = trust_by_point(report(0.05, 0.01, [{"code": "model_not_converged", "severity": "warning", "message": "m"}]))
    assert warned[3]["badge"] == "caution" and "model_not_converged" in warned[3]["cautions"][0]
    info = trust_by_point(report(0.05, 0.01, [{"code": "batchnorm_dropout", "severity": "info", "message": "m"}]))
    assert info[3]["badge"] == "ok"


# -- runs of the shipped examples ------------------------------------------------------------------------------
def _report(root: Path, name: str, file: str) -> dict:
    directory = root / name / "version_0" / "influence"
    return json.loads((directory / file).read_text())


def test_text_example_sends_the_decoded_sentences(examples):
    root, url = examples
    report = _report(root, "text_classification", "epoch=0.json")
    point = report["points"][0]
    _, detail = call(url, "point", run="text_classification/version_0", epoch=0, val_index=point["val_index"])
    assert detail["text"] == report["examples"]["val"][str(point["val_index"])]["text"]
    assert detail["text"].startswith("[CLS]")
    for entry in detail["harmful"] + detail["helpful"]:
        assert entry["text"] == report["examples"]["train"][str(entry["train_index"])]["text"] and entry["text"]
    _, page = call(url, "influencers", run="text_classification/version_0", epoch=0)
    assert all(e["text"] for e in page["examples"])


def test_both_examples_choose_their_damping_by_the_default_self_check(examples):
    """The shipped examples run the callback's default damping rule, not its fallback: the tiny BERT's check used to
    refuse itself (it timed autograd's curvature product, far slower than the stored Jacobian's its solves use)
    and the analysis fell back to damping='auto'."""
    root, _ = examples
    for name in ("text_classification", "digits"):
        solver = _report(root, name, "epoch=0.json")["solver"]
        assert solver["damping_requested"] == "self_check", name
        check = solver["damping_check"]
        assert solver["damping"] == check["chosen"] in check["candidates"], name
        assert all(math.isfinite(v) for v in check["lds"]), name


def test_text_example_writes_a_mislabel_report_with_the_decoded_sentences(examples):
    from examples.text_classification import KeywordSequences, decode

    root, url = examples
    report = _report(root, "text_classification", "mislabel_epoch=0.json")
    assert report["ranking"] == DEFAULT_SCORE and report["training_signals"]["recorded"]
    assert len(report["candidates"]) == 32 and report["estimated_flips"] is not None
    data = KeywordSequences(512, seed=0, flip=0.05)  # the example's training set
    train = report["examples"]["train"]
    for candidate in report["candidates"]:
        index = candidate["train_index"]
        assert candidate["label"] == int(data.labels[index])
        assert train[str(index)]["text"] == decode(data[index]) != ""  # the example's own formatter, per candidate
    _, page = call(url, "mislabel", run="text_classification/version_0", epoch=0, limit=50)
    assert page["ranking"] == DEFAULT_SCORE and page["all"] == 32
    assert [row["text"] for row in page["candidates"]] == [train[str(c["train_index"])]["text"]
                                                          for c in report["candidates"]]


def test_digits_example_writes_a_mislabel_report_shown_in_its_ranking(examples):
    root, url = examples
    report = _report(root, "digits", "mislabel_epoch=0.json")
    assert report["ranking"] == DEFAULT_SCORE and report["training_signals"]["recorded"]
    status, page = call(url, "mislabel", run="digits/version_0", epoch=0, limit=5)
    assert status == 200 and page["ranking"] == DEFAULT_SCORE and "el2n" in page["ranking_definition"].lower()
    assert page["score_name"] == DEFAULT_SCORE and page["all"] == len(report["candidates"]) == 32
    for row, candidate in zip(page["candidates"], report["candidates"]):
        assert (row["score"], row["model_prediction"], row["suggested_label"]) == (
            candidate["score"], candidate["prediction"], candidate["suggested_label"])
    scores = [c["score"] for c in report["candidates"]]
    assert scores == sorted(scores, reverse=True)
    disagree = [c["train_index"] for c in report["candidates"] if c["label"] != c["prediction"]]
    _, chosen = call(url, "select", run="digits/version_0", epoch=0, wrong="1")  # every candidate, not the page
    assert chosen["train_indices"] == disagree and len(disagree) > 5
    with urllib.request.urlopen(f"{url}/data/plugin/influence/relabel.csv?" + urllib.parse.urlencode(
            {"run": "digits/version_0", "epoch": 0, "all": "1"}), timeout=30) as response:
        rows = list(csv.DictReader(io.StringIO(response.read().decode())))
    assert [int(r["rank"]) for r in rows] == list(range(1, 33))
    first, second = (c["train_index"] for c in report["candidates"][:2])  # a label edited in the table wins
    with urllib.request.urlopen(f"{url}/data/plugin/influence/relabel.csv?" + urllib.parse.urlencode(
            {"run": "digits/version_0", "epoch": 0, "train_indices": f"{first},{second}",
             "new_labels": f"{first}:7"}), timeout=30) as response:
        rows = list(csv.DictReader(io.StringIO(response.read().decode())))
    assert [r["new_label"] for r in rows] == ["7", str(report["candidates"][1]["suggested_label"])]
    status, body = call(url, "relabel.csv", run="digits/version_0", epoch=0, train_indices=str(first),
                        new_labels=f"{second}:1")
    assert status == 400 and "selected candidates only" in body["error"]
    other = next(name for name in report["rankings"] if name != DEFAULT_SCORE)
    _, reordered = call(url, "mislabel", run="digits/version_0", epoch=0, order=other, limit=500)
    position = {index: k for k, index in enumerate(report["rankings"][other])}
    shown = [position.get(c["train_index"], len(position)) for c in reordered["candidates"]]
    assert shown == sorted(shown) and reordered["order"] == other


def test_points_sort_filter_search_and_deep_link_growth(examples):
    root, url = examples
    report = _report(root, "digits", "epoch=0.json")
    run = {"run": "digits/version_0", "epoch": 0}
    _, by_index = call(url, "points", sort="index", **run)
    assert [p["val_index"] for p in by_index["points"]] == sorted(p["val_index"] for p in report["points"])
    label = str(report["points"][0]["label"])
    _, filtered = call(url, "points", label=label, **run)
    assert {str(p["label"]) for p in filtered["points"]} == {label} and filtered["all"] == len(report["points"])
    _, wrong = call(url, "points", wrong="1", **run)
    assert all(p["label"] != p["prediction"] for p in wrong["points"])
    last = sorted(report["points"], key=lambda p: -p["loss"])[-1]["val_index"]
    _, grown = call(url, "points", limit=1, ensure=last, **run)
    assert grown["points"][-1]["val_index"] == last and len(grown["points"]) == len(report["points"])
    _, one = call(url, "influencers", index=str(report["points"][0]["harmful"][0][0]), **run)
    assert [e["train_index"] for e in one["examples"]] == [report["points"][0]["harmful"][0][0]]


def test_class_summary_counts_the_top_lists(examples):
    root, url = examples
    report = _report(root, "digits", "epoch=0.json")
    train = report["examples"]["train"]
    _, classes = call(url, "classes", run="digits/version_0", epoch=0)
    total = sum(cell["harmful"] for row in classes["cells"] for cell in row)
    assert total == sum(len(p["harmful"]) for p in report["points"])
    point = report["points"][0]
    index, _ = point["harmful"][0]
    r, c = classes["rows"].index(str(train[str(index)]["label"])), classes["columns"].index(str(point["label"]))
    assert classes["cells"][r][c]["harmful"] >= 1


def test_an_unexpected_error_is_a_json_500_not_an_html_page(tmp_path):
    from types import SimpleNamespace

    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    from lightning_influence.dashboard.plugin import InfluencePlugin

    plugin = InfluencePlugin(SimpleNamespace(logdir=str(tmp_path), data_provider=None))
    apps = plugin.get_plugin_apps()

    def broken() -> None:
        raise RuntimeError("something nobody planned for")

    plugin.data.runs = broken  # type: ignore[method-assign]
    response = Client(apps["/runs"], Response).get("/runs")
    body = json.loads(response.get_data(as_text=True))
    assert response.status_code == 500 and response.headers["Content-Type"].startswith("application/json")
    assert body["error"] == "RuntimeError: something nobody planned for" and "rest of the tab" in body["hint"]
    plugin.data = type(plugin.data)(str(tmp_path))  # the real data on an empty log dir: no runs, no error
    assert json.loads(Client(plugin.get_plugin_apps()["/runs"], Response).get("/runs").get_data(as_text=True)) == {
        "runs": [], "unreadable": []}
