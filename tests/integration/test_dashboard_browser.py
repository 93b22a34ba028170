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
import urllib.parse
from pathlib import Path

import pytest
from helpers.dashboard_broken import broken_runs
from helpers.dashboard_runs import example_runs, fitted_runs

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
# scripts/ holds these helpers; they import only after the sys.path entry above.
from dashboard_server import running_dashboard, wait_for_scalars  # noqa: E402
from headless_chromium import Chromium, find_chromium  # noqa: E402

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
    if kind == "text":  # no example_formatter in this run: the token ids themselves are in the DOM
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


# -- the shipped examples, broken files, deep links, live refresh, interaction -----------------------------------
def frame(page, expression: str):
    return page.evaluate(expression.replace("DOC", DOC))


def wait(page, expression: str, timeout: float = 30):
    return page.wait_for(f"!!({expression.replace('DOC', DOC)})", timeout=timeout)  # an element comes back as {}


def open_hash(chromium: Chromium, url: str, **state) -> object:
    """The dashboard opened on a deep link: TensorBoard's hash with the plugin's p.influence.* keys."""
    keys = "".join(f"&p.influence.{k}={urllib.parse.quote(str(v), safe='')}" for k, v in state.items())
    page = chromium.open(f"{url}/#influence{keys}")
    wait(page, "DOC && DOC.querySelector('#li-main') && !DOC.querySelector('#li-main .loading')", timeout=60)
    return page


@pytest.fixture(scope="module")
def example_site():
    executable = chromium_or_skip()
    root = example_runs()
    with running_dashboard(root) as url, Chromium(executable) as chromium:
        yield root, url, chromium


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    executable = chromium_or_skip()
    root = broken_runs(fitted_runs() / "image" / "version_0", tmp_path_factory.mktemp("broken"))
    with running_dashboard(root) as url, Chromium(executable) as chromium:
        yield root, url, chromium


def test_text_example_shows_its_sentences(example_site):
    root, url, chromium = example_site
    report = json.loads((root / "text_classification" / "version_0" / "influence" / "epoch=0.json").read_text())
    page = open_hash(chromium, url, run="text_classification/version_0")
    wait(page, "DOC.querySelectorAll('#li-harmful .render.text').length")
    first = max(report["points"], key=lambda p: p["loss"])
    shown = frame(page, "[...DOC.querySelectorAll('#li-harmful .render.text')].map(e => e.textContent)")
    assert shown == [report["examples"]["train"][str(i)]["text"] for i, _ in first["harmful"]]
    assert all(s.startswith("[CLS]") for s in shown)
    head = frame(page, "DOC.querySelector('#li-point-detail .render.text.large').textContent")
    assert head.startswith(report["examples"]["val"][str(first["val_index"])]["text"][:40])
    assert frame(page, "DOC.querySelectorAll('.render.none').length") == 0  # no "no input" tile anywhere


def test_text_example_mislabel_tab_shows_the_candidates_sentences(example_site):
    root, url, chromium = example_site
    report = json.loads((root / "text_classification" / "version_0" / "influence" / "mislabel_epoch=0.json")
                        .read_text())
    page = open_hash(chromium, url, run="text_classification/version_0", tab="mislabel")
    wait(page, "DOC.querySelectorAll('#li-candidates tbody tr .render.text').length === 32")
    shown = frame(page, "[...DOC.querySelectorAll('#li-candidates tbody tr .render.text')].map(e => e.textContent)")
    expected = [report["examples"]["train"][str(c["train_index"])]["text"] for c in report["candidates"]]
    assert shown == expected  # the small tiles hold the whole sentence
    assert all(text.startswith("[CLS]") for text in shown)
    assert frame(page, "DOC.querySelectorAll('#li-candidates .render.none').length") == 0  # no "no input" tile


def test_digits_example_mislabel_tab_states_its_ranking_and_selects_every_candidate(example_site):
    root, url, chromium = example_site
    report = json.loads((root / "digits" / "version_0" / "influence" / "mislabel_epoch=0.json").read_text())
    page = open_hash(chromium, url, run="digits/version_0", tab="mislabel")
    wait(page, "DOC.querySelectorAll('#li-candidates tbody tr').length")
    ranking = frame(page, "DOC.querySelector('#li-ranking').innerText")
    assert f"ranked by {report['ranking']}" in ranking and report["ranking_definition"][:30] in ranking
    headers = frame(page, "[...DOC.querySelectorAll('#li-candidates thead th')].map(t => t.textContent)")
    assert f"score ({report['ranking']})" in headers and "model pred." in headers and "suggested" in headers
    estimate = report.get("estimated_flips")  # the count of wrong labels and the flags, when the report has them
    if estimate:
        assert f"the first {estimate['flagged']} candidates are flagged" in ranking and "flagged" in headers
        assert ("plausible range" in ranking) == (estimate.get("plausible_high") is not None)
        flags = frame(page, "[...DOC.querySelectorAll('#li-candidates td.flagged')].map(t => t.textContent)")
        assert flags == ["yes" if c["flagged"] else "" for c in report["candidates"]]
    scores = frame(page, "[...DOC.querySelectorAll('#li-candidates td.score')].map(t => Number(t.textContent))")
    assert scores == sorted(scores, reverse=True) and len(scores) == 32
    label = str(report["candidates"][0]["label"])  # filter to one given label, then select all 32
    frame(page, "(() => { const s = DOC.querySelector('#li-filter-given'); s.value = " + json.dumps(label)
          + "; s.dispatchEvent(new Event('change')); })()")
    wait(page, "[...DOC.querySelectorAll('#li-candidates td.given')].every(t => t.textContent === "
         + json.dumps(label) + ")")
    shown = frame(page, "DOC.querySelectorAll('#li-candidates tbody tr').length")
    assert shown < 32
    frame(page, "DOC.querySelector('#li-select-all').click()")
    wait(page, "DOC.querySelector('#li-relabel').textContent.includes('(32 selected)')")
    href = frame(page, "DOC.querySelector('#li-relabel').href")
    assert len(urllib.parse.parse_qs(urllib.parse.urlparse(href).query)["train_indices"][0].split(",")) == 32
    first = report["candidates"][0]["train_index"]  # editing a new label goes into the CSV link
    frame(page, "DOC.querySelector('#li-filter-given').value = ''; DOC.querySelector('#li-filter-given')"
          ".dispatchEvent(new Event('change'))")
    wait(page, f"DOC.querySelector('#li-candidates tr[data-train-index=\"{first}\"] input.new-label')")
    frame(page, f"(() => {{ const i = DOC.querySelector('#li-candidates tr[data-train-index=\"{first}\"] input.new-label');"
          " i.value = '7'; i.dispatchEvent(new Event('change')); })()")
    href = frame(page, "DOC.querySelector('#li-relabel').href")
    assert urllib.parse.parse_qs(urllib.parse.urlparse(href).query)["new_labels"] == [f"{first}:7"]
    # a candidate -> its influence on the monitored points
    frame(page, f"DOC.querySelector('#li-candidates tr[data-train-index=\"{first}\"] .open-example').click()")
    wait(page, f"DOC.querySelector('#li-example-detail')?.dataset.trainIndex === '{first}'")


def test_deep_links_restore_run_epoch_point_and_example(browser):
    root, url, chromium, _ = browser
    points = sorted(report(root, "image", "epoch=0.json")["points"], key=lambda p: -p["loss"])
    chosen = points[-1]["val_index"]
    page = open_hash(chromium, url, run="image/version_0", epoch=0, tab="points", point=chosen)
    wait(page, f"DOC.querySelector('#li-point-detail')?.dataset.valIndex === '{chosen}'")
    assert frame(page, "DOC.querySelector('#li-analysis').value") == "0"
    assert frame(page, "DOC.querySelector('#li-points .row.selected').dataset.valIndex") == str(chosen)
    train = report(root, "image", "epoch=0.json")["points"][0]["harmful"][1][0]
    page = open_hash(chromium, url, run="image/version_0", epoch=0, tab="examples", example=train)
    wait(page, f"DOC.querySelector('#li-example-detail')?.dataset.trainIndex === '{train}'")
    frame(page, "DOC.querySelector('#li-example-detail tbody tr').click()")  # the hash follows the view
    wait(page, "DOC.querySelector('#li-point-detail')")
    assert "p.influence.tab=points" in page.evaluate("location.hash")


def test_epoch_change_keeps_the_point_and_clicks_keep_the_list(browser):
    root, url, chromium, _ = browser
    both = {p["val_index"] for p in report(root, "image", "epoch=0.json")["points"]} & {
        p["val_index"] for p in report(root, "image")["points"]}
    if not both:
        pytest.skip("no point is in both analyses of this run")
    chosen = min(both)
    page = open_hash(chromium, url, run="image/version_0", epoch=1, point=chosen)
    wait(page, f"DOC.querySelector('#li-point-detail')?.dataset.valIndex === '{chosen}'")
    frame(page, "(() => { const s = DOC.querySelector('#li-analysis'); s.value = '0'; s.dispatchEvent(new Event('change')); })()")
    wait(page, "DOC.querySelector('#li-analysis').value === '0' && DOC.querySelector('#li-point-detail')")
    assert frame(page, "DOC.querySelector('#li-point-detail').dataset.valIndex") == str(chosen)
    frame(page, "DOC.querySelector('#li-points').marker = 'same list'")
    other = frame(page, "[...DOC.querySelectorAll('#li-points .row')].map(r => r.dataset.valIndex).find(v => v !== '"
                  + str(chosen) + "')")
    frame(page, f"DOC.querySelector('#li-points [data-val-index=\"{other}\"]').click()")
    wait(page, f"DOC.querySelector('#li-point-detail').dataset.valIndex === '{other}'")
    assert frame(page, "DOC.querySelector('#li-points').marker") == "same list"  # not redrawn: scroll kept
    frame(page, "DOC.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown', bubbles: true}))")
    wait(page, f"DOC.querySelector('#li-point-detail').dataset.valIndex !== '{other}'")
    frame(page, "DOC.querySelector('#li-point-detail img.render.image.large').click()")  # zoom, Escape closes
    wait(page, "DOC.querySelector('#li-zoom img')")
    frame(page, "DOC.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}))")
    wait(page, "!DOC.querySelector('#li-zoom')")


def test_tensorboard_reload_shows_a_new_analysis(browser):
    root, url, chromium, _ = browser
    directory = root / "image" / "version_0" / "influence"
    page = open_hash(chromium, url, run="image/version_0")
    wait(page, "DOC.querySelectorAll('#li-analysis option').length === 2")
    added = json.loads((directory / "epoch=1.json").read_text())
    added["epoch"] = 7
    (directory / "epoch=7.json").write_text(json.dumps(added))
    try:
        time.sleep(2.5)  # the server's run list is cached for 2 s
        before = int(frame(page, "DOC.documentElement.dataset.reloads || '0'"))
        page.evaluate("document.querySelector('app-header-reload button').click()")
        wait(page, "[...DOC.querySelectorAll('#li-analysis option')].some(o => o.value === '7')", timeout=20)
        assert int(frame(page, "DOC.documentElement.dataset.reloads || '0'")) > before  # TensorBoard's message
    finally:
        (directory / "epoch=7.json").unlink()


def test_dark_mode_follows_tensorboard(browser):
    _, url, chromium, _ = browser
    page = chromium.open("about:blank")
    page.send("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    page.send("Page.navigate", {"url": f"{url}/#influence"})
    wait(page, "DOC && DOC.documentElement.classList.contains('dark')", timeout=60)
    background = frame(page, "getComputedStyle(DOC.body).backgroundColor")
    assert background != "rgb(250, 250, 250)"


def test_bad_files_leave_the_rest_working_with_a_readable_message(broken_site):
    root, url, chromium = broken_site
    page = open_hash(chromium, url, run="good/version_0")
    wait(page, "DOC.querySelector('#li-unreadable')")
    banner = frame(page, "DOC.querySelector('#li-unreadable').textContent")
    assert "3 report file(s) could not be read" in banner
    assert "truncated" in banner and "JSON list" in banner and "mislabel_epoch=1.json" in banner
    wait(page, "DOC.querySelectorAll('#li-harmful [data-train-index]').length")  # the good run works
    page = open_hash(chromium, url, run="truncated/version_0")
    wait(page, "DOC.querySelectorAll('#li-harmful [data-train-index]').length")
    assert frame(page, "[...DOC.querySelectorAll('#li-analysis option')].map(o => o.value)") == ["0"]
    page = open_hash(chromium, url, run="missing_shard/version_0", epoch=1)
    wait(page, "DOC.querySelector('#li-scores-error') && DOC.querySelectorAll('#li-harmful [data-train-index]').length")
    assert "missing" in frame(page, "DOC.querySelector('#li-scores-error').textContent")
    page = open_hash(chromium, url, run="nan/version_0", epoch=1)
    wait(page, "DOC.querySelectorAll('#li-harmful [data-train-index]').length")
    assert "loss –" in frame(page, "DOC.querySelector('#li-points').innerText")
    page = open_hash(chromium, url, run="zero_points/version_0", epoch=1)
    wait(page, "DOC.querySelector('#li-no-points')")
    assert "no validation points" in frame(page, "DOC.querySelector('#li-no-points').textContent")
    page = open_hash(chromium, url, run="no_global_step/version_0", epoch=1)
    wait(page, "DOC.querySelectorAll('#li-harmful [data-train-index]').length")
    page = open_hash(chromium, url, run="bad_mislabel/version_0", tab="mislabel")
    wait(page, "DOC.querySelectorAll('#li-candidates tbody tr').length")
    assert frame(page, "[...DOC.querySelectorAll('#li-mislabel-epoch option')].map(o => o.value)") == ["0"]
    page = open_hash(chromium, url, run="mislabel_only/version_0")  # no analysis: say so, offer the Mislabel tab
    wait(page, "DOC.querySelector('#li-only-mislabel button')")
    assert "no influence analysis" in frame(page, "DOC.querySelector('#li-only-mislabel').textContent")
    frame(page, "DOC.querySelector('#li-only-mislabel button').click()")
    wait(page, "DOC.querySelectorAll('#li-candidates tbody tr').length")


def test_a_report_broken_while_open_gives_a_message_in_its_pane_only(broken_site):
    root, url, chromium = broken_site
    page = open_hash(chromium, url, run="good/version_0", epoch=1)
    wait(page, "DOC.querySelectorAll('#li-points .row').length > 1 && DOC.querySelector('#li-point-detail')")
    path = root / "good" / "version_0" / "influence" / "epoch=1.json"
    text = path.read_text()
    path.write_text(text[:100])
    try:
        other = frame(page, "DOC.querySelectorAll('#li-points .row')[1].dataset.valIndex")
        frame(page, f"DOC.querySelector('#li-points [data-val-index=\"{other}\"]').click()")
        wait(page, "DOC.querySelector('#li-detail-error')")
        message = frame(page, "DOC.querySelector('#li-detail-error').innerText")
        assert "Cannot read" in message and "epoch=1.json" in message and "<" not in message
        assert frame(page, "DOC.querySelectorAll('#li-points .row').length") > 1  # the list stays
    finally:
        path.write_text(text)
