"""Regenerate the Influence dashboard screenshots in docs/images/ (dashboard-*.png).

Trains three small demo runs with InfluenceCallback (digits images, token-id text, tabular features; the
dashboard tests' fixtures in ``tests/helpers/dashboard_runs.py``, with more points and a longer mislabel list), or takes
``--logdir`` of existing runs, starts a real ``tensorboard`` on 127.0.0.1 and drives Debian's headless
``chromium`` (``scripts/install_chromium.sh``) through each view of the Influence tab, saving one PNG per view.

    python scripts/dashboard_screenshots.py --out docs/images
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dashboard_server import running_dashboard, wait_for_scalars
from headless_chromium import Chromium, Page
from tensorboard_server import get_json

DOC = "document.querySelector('iframe[src*=\"name=influence\"]').contentDocument"
DEMO = {"num_worst": 6, "top_k": 5, "mislabel_candidates": 20, "mislabel_rank": 16}


def train_demo_runs(root: Path) -> None:
    import conftest  # noqa: F401 - one thread, as in the tests
    from helpers.dashboard_runs import fit_run

    fit_run(root, "image", epochs=9, every_n_epochs=3, **DEMO)  # analyses at epochs 2, 5 and 8
    fit_run(root, "text", epochs=6, every_n_epochs=2, **DEMO)
    fit_run(root, "tabular", epochs=6, every_n_epochs=2, **DEMO)


def js(expression: str) -> str:
    return expression.replace("DOC", DOC)


def open_run(chromium: Chromium, url: str, run: str) -> Page:
    page = chromium.open(f"{url}/#influence")
    page.wait_for(js("DOC.querySelectorAll('#li-points [data-val-index]').length"), timeout=60)
    page.evaluate(js(f"(() => {{ const s = DOC.querySelector('#li-run'); s.value = {json.dumps(run)};"
                     " s.dispatchEvent(new Event('change')); })()"))
    page.wait_for(js(f"DOC.querySelector('#li-run').value === {json.dumps(run)} &&"
                     " DOC.querySelectorAll('#li-harmful [data-train-index]').length > 0"))
    return page


def click(page: Page, selector: str) -> None:
    page.evaluate(js(f"DOC.querySelector({json.dumps(selector)}).click()"))


def element_clip(page: Page, selector: str, pad: int = 8) -> dict[str, float]:
    """The page rectangle of an element inside the dashboard's iframe (for a cropped screenshot)."""
    return page.evaluate(js(f"""(() => {{
        const frame = document.querySelector('iframe[src*="name=influence"]').getBoundingClientRect();
        const r = DOC.querySelector({json.dumps(selector)}).getBoundingClientRect();
        return {{x: Math.max(0, frame.x + r.x - {pad}), y: Math.max(0, frame.y + r.y - {pad}),
                 width: r.width + 2 * {pad}, height: r.height + 2 * {pad}}};
    }})()"""))


def most_compared_point(url: str, run: str) -> int:
    """The latest analysis' point present in the most analyses (highest loss first among ties)."""
    base = f"{url}/data/plugin/influence"
    epoch = get_json(f"{base}/runs?")["runs"]
    epoch = next(r for r in epoch if r["run"] == run)["analyses"][-1]["epoch"]
    points = get_json(f"{base}/points?{urllib.parse.urlencode({'run': run, 'epoch': epoch})}")["points"]
    history = {p["val_index"]: len(get_json(f"{base}/compare?{urllib.parse.urlencode({'run': run, 'val_index': p['val_index']})}")
                                   ["analyses"]) for p in points}
    return max(history, key=lambda i: (history[i], -[p["val_index"] for p in points].index(i)))


def settle(page: Page) -> None:
    page.evaluate("new Promise(r => setTimeout(r, 400))")


def shoot(logdir: Path, out: Path) -> list[Path]:
    written = []
    with running_dashboard(logdir) as url, Chromium(width=1400, height=900) as chromium:
        wait_for_scalars(url, "image/version_0", "influence/cg_trace/")
        page = open_run(chromium, url, "image/version_0")
        chosen = most_compared_point(url, "image/version_0")
        click(page, f"#li-points [data-val-index='{chosen}']")
        page.wait_for(js(f"DOC.querySelector('#li-point-detail').dataset.valIndex === '{chosen}'"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-points.png"))
        page.evaluate(js("DOC.querySelector('#li-compare').scrollIntoView()"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-compare.png", element_clip(page, "#li-compare")))

        train_index = page.evaluate(js("DOC.querySelector('#li-harmful [data-train-index]').dataset.trainIndex"))
        click(page, f"#li-harmful [data-train-index='{train_index}']")
        page.wait_for(js(f"DOC.querySelector('#li-example-detail')?.dataset.trainIndex === '{train_index}'"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-examples.png"))

        click(page, "[data-tab='mislabel']")
        page.wait_for(js("DOC.querySelectorAll('#li-candidates tbody tr').length > 0"))
        click(page, "#li-select-disagree")
        settle(page)
        written.append(page.screenshot(out / "dashboard-mislabel.png"))

        for kind in ("text", "tabular"):
            page = open_run(chromium, url, f"{kind}/version_0")
            settle(page)
            written.append(page.screenshot(out / f"dashboard-{kind}.png"))

        wait_for_scalars(url, "tabular/version_0", "influence/lissa_trace/")  # LiSSA: repeats and their agreement
        click(page, "[data-tab='trust']")
        page.wait_for(js("!!DOC.querySelector('#li-trace')"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-trust.png"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where to write the PNGs")
    parser.add_argument("--logdir", type=Path, help="existing runs image/, text/, tabular/ (default: train demo runs)")
    parser.add_argument("--train-only", type=Path, help=argparse.SUPPRESS)  # the child process that trains
    args = parser.parse_args()
    if args.train_only is not None:
        train_demo_runs(args.train_only)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dashboard-demo-") as scratch:
        logdir = args.logdir
        if logdir is None:  # train in a fresh process: this one then starts chromium without torch's threads
            logdir = Path(scratch)
            subprocess.run([sys.executable, __file__, "--train-only", str(logdir)], check=True)
        for path in shoot(logdir, args.out):
            print(path)


if __name__ == "__main__":
    main()
