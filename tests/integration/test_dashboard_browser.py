"""The Influence tab in a real headless Chromium, inside TensorBoard's own page, against real callback runs.

Chromium comes from Debian (``scripts/install_chromium.sh``, which ``.ci/run`` calls; the fixture calls it once
more when chromium is missing). The tests skip, saying why, only when it cannot be installed.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.dashboard_runs import fitted_runs

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from dashboard_server import running_dashboard, wait_for_scalars
from headless_chromium import Chromium, find_chromium

DOC = "document.querySelector('iframe[src*=\"name=influence\"]').contentDocument"


def chromium_or_skip() -> str:
    path = find_chromium()
    if path is None:
        try:
            done = subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True,
                                  text=True, timeout=900, check=False)
            why = (done.stdout + done.stderr).strip().splitlines()[-3:]
        except (OSError, subprocess.TimeoutExpired) as err:
            why = [str(err)]
        path = find_chromium()
        if path is None:
            pytest.skip("chromium is not installed and scripts/install_chromium.sh could not install it: "
                        + " | ".join(why))
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium_or_skip()
    root = fitted_runs()
    downloads = tmp_path_factory.mktemp("downloads")
    with running_dashboard(root) as url, Chromium(executable) as chromium:
        chromium.allow_downloads(downloads)
        yield root, url, chromium, downloads


def report(root: Path, kind: str, name: str = "epoch=1.json") -> dict:
    return json.loads((root / kind / "version_0" / "influence" / name).read_text())


def open_dashboard(chromium: Chromium, url: str, run: str):
    page = chromium.open(f"{url}/#influence")
    page.wait_for(f"{DOC}.querySelectorAll('#li-points [data-val-index]').length", timeout=60)
    if page.evaluate(f"{DOC}.querySelector('#li-run').value") != run:
        page.evaluate(f"(() => {{ const s = {DOC}.querySelector('#li-run'); s.value = {json.dumps(run)};"
                      " s.dispatchEvent(new Event('change')); })()")
    page.wait_for(f"{DOC}.querySelector('#li-point-detail') && {DOC}.querySelector('#li-run').value === {json.dumps(run)}"
                  f" && {DOC}.querySelectorAll('#li-harmful [data-train-index]').length")
    return page


def dom_indices(page, selector: str, attribute: str = "trainIndex") -> list[int]:
    return [int(v) for v in page.evaluate(f"[...{DOC}.querySelectorAll({json.dumps(selector)})]"
                                          f".map(e => e.dataset.{attribute})")]


def js_exponential(value: float) -> str:
    """``value`` as the dashboard prints it (JavaScript's ``toExponential(2)`` with a sign: ``+1.06e+0``)."""
    return f"{value:+.2e}".replace("e+0", "e+").replace("e-0", "e-")


def click(page, selector: str) -> None:
    page.evaluate(f"{DOC}.querySelector({json.dumps(selector)}).click()")


def test_selecting_a_point_shows_its_training_indices_from_the_json(browser):
    root, url, chromium, _ = browser
    page = open_dashboard(chromium, url, "image/version_0")
    points = sorted(report(root, "image")["points"], key=lambda p: -p["loss"])
    assert dom_indices(page, "#li-points [data-val-index]", "valIndex") == [p["val_index"] for p in points]
    chosen = points[1]  # not the one shown first
    click(page, f"#li-points [data-val-index='{chosen['val_index']}']")
    page.wait_for(f"{DOC}.querySelector('#li-point-detail').dataset.valIndex === '{chosen['val_index']}'")
    assert dom_indices(page, "#li-harmful [data-train-index]") == [i for i, _ in chosen["harmful"]]
    assert dom_indices(page, "#li-helpful [data-train-index]") == [i for i, _ in chosen["helpful"]]
    text = page.evaluate(f"{DOC}.querySelector('#li-point-detail').innerText")
    assert f"Validation point #{chosen['val_index']}" in text and js_exponential(chosen["harmful"][0][1]) in text
    assert page.evaluate(f"{DOC}.querySelectorAll('#li-harmful img.render.image').length") == len(chosen["harmful"])
    assert page.evaluate(f"{DOC}.querySelectorAll('#li-compare tbody tr').length") == 2  # epochs 0 and 1


def test_clicking_an_example_shows_every_point_it_influences(browser):
    root, url, chromium, _ = browser
    page = open_dashboard(chromium, url, "image/version_0")
    train_index = dom_indices(page, "#li-harmful [data-train-index]")[0]
    click(page, f"#li-harmful [data-train-index='{train_index}']")
    page.wait_for(f"{DOC}.querySelector('#li-example-detail')?.dataset.trainIndex === '{train_index}'")
    shown = dom_indices(page, "#li-example-detail tbody [data-val-index]", "valIndex")
    assert sorted(shown) == sorted(p["val_index"] for p in report(root, "image")["points"])  # full scores: all points
    harmful_counts = [int(v) for v in page.evaluate(
        f"[...{DOC}.querySelectorAll('#li-influencers .row')].map(r => r.innerText.match(/harmful to (\\d+)/)[1])")]
    assert harmful_counts == sorted(harmful_counts, reverse=True) and harmful_counts[0] >= 1


def test_relabel_csv_download_holds_the_selected_candidates(browser):
    root, url, chromium, downloads = browser
    page = open_dashboard(chromium, url, "image/version_0")
    click(page, "[data-tab='mislabel']")
    page.wait_for(f"{DOC}.querySelectorAll('#li-candidates tbody tr').length")
    candidates = report(root, "image", "mislabel_epoch=1.json")["candidates"]
    assert dom_indices(page, "#li-candidates tbody tr") == [c["train_index"] for c in candidates]
    chosen = [candidates[0]["train_index"], candidates[2]["train_index"]]
    for count, index in enumerate(chosen, start=1):
        click(page, f"#li-candidates tr[data-train-index='{index}'] input[type=checkbox]")
        page.wait_for(f"{DOC}.querySelector('#li-relabel').textContent.includes('({count} selected)')")
    assert page.evaluate(f"{DOC}.querySelectorAll('#li-candidates input:checked').length") == 2
    confusion = page.evaluate(f"{DOC}.querySelector('#li-confusion').innerText")
    assert "given" in confusion
    click(page, "#li-relabel")
    target = downloads / "relabel_epoch=1.csv"
    deadline = time.monotonic() + 30
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert [int(r["train_index"]) for r in rows] == chosen
    by_index = {c["train_index"]: c for c in candidates}
    assert [(r["given_label"], r["new_label"]) for r in rows] == [
        (str(by_index[i]["label"]), str(by_index[i]["prediction"])) for i in chosen]


@pytest.mark.parametrize("kind, rendering", [("text", ".render.tokens"), ("tabular", ".render.tabular")])
def test_text_and_tabular_runs_render_their_inputs(browser, kind, rendering):
    root, url, chromium, _ = browser
    page = open_dashboard(chromium, url, f"{kind}/version_0")
    first = max(report(root, kind)["points"], key=lambda p: p["loss"])
    assert dom_indices(page, "#li-harmful [data-train-index]") == [i for i, _ in first["harmful"]]
    assert page.evaluate(f"{DOC}.querySelectorAll('#li-harmful {rendering}').length") == len(first["harmful"])
    if kind == "text":  # the token ids themselves are in the DOM
        ids = report(root, kind)["examples"]["train"][str(first["harmful"][0][0])]["input"]["values"]
        tokens = page.evaluate(f"[...{DOC}.querySelector('#li-harmful {rendering}').querySelectorAll('.token')]"
                               ".map(t => Number(t.textContent))")
        assert tokens == ids


@pytest.mark.parametrize("kind, solver, repeats", [("image", "cg", 1), ("tabular", "lissa", 2)])
def test_trust_tab_shows_warnings_residuals_and_the_solver_trace(browser, kind, solver, repeats):
    root, url, chromium, _ = browser
    wait_for_scalars(url, f"{kind}/version_0", f"influence/{solver}_trace/epoch_1/")
    page = open_dashboard(chromium, url, f"{kind}/version_0")
    click(page, "[data-tab='trust']")
    page.wait_for(f"!!{DOC}.querySelector('#li-trust')")
    trust = report(root, kind)["trust"]
    warnings = page.evaluate(f"{DOC}.querySelector('#li-warnings').innerText")
    assert all(w["code"] in warnings and w["message"] in warnings for w in trust["warnings"])
    assert dom_indices(page, ".trust-points tbody tr", "valIndex") == [p["val_index"] for p in trust["points"]]
    assert page.evaluate(f"{DOC}.querySelectorAll('#li-trace polyline.trace').length") == repeats
