"""Regenerate the Influence dashboard screenshots in docs/images/ (dashboard-*.png).

Trains the runs the dashboard tests use, with more epochs: the shipped examples ``examples/digits.py`` (two
epochs, an analysis and a mislabel report after each) and ``examples/text_classification.py`` (its real dict
batches and decoded sentences), plus the tests' tabular run (``tests/helpers/dashboard_runs.py``); or takes
``--logdir`` of existing runs laid out the same way. It starts a real ``tensorboard`` on 127.0.0.1 and drives
Debian's headless ``chromium`` (``scripts/install_chromium.sh``) through each view of the Influence tab, saving
one PNG per view, and one of a log directory with broken files (``tests/helpers/dashboard_broken.py``).

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

# These modules live in scripts/ and tests/, importable only after the sys.path entries above.
from dashboard_server import running_dashboard, wait_for_scalars  # noqa: E402
from headless_chromium import Chromium, Page  # noqa: E402
from tensorboard_server import get_json  # noqa: E402

DOC = "document.querySelector('iframe[src*=\"name=influence\"]').contentDocument"
DEMO = {"num_worst": 6, "top_k": 5, "mislabel_candidates": 20, "mislabel_rank": 16}
DIGITS, TEXT = "digits/version_0", "text_classification/version_0"


def train_demo_runs(root: Path) -> None:
    import conftest  # noqa: F401 - one thread, as in the tests
    from helpers.dashboard_runs import fit_run, run_example

    run_example(root, "digits", ["--epochs", "2", "--every-n-epochs", "1"])  # analyses at epochs 0 and 1
    run_example(root, "text_classification", ["--epochs", "1"])
    fit_run(root, "tabular", epochs=6, every_n_epochs=2, **DEMO)


def js(expression: str) -> str:
    return expression.replace("DOC", DOC)


def open_run(chromium: Chromium, url: str, run: str, **state: object) -> Page:
    """The tab opened on a deep link to ``run`` (and ``state``: epoch, tab, point, ...), loaded."""
    keys = "".join(f"&p.influence.{k}={urllib.parse.quote(str(v), safe='')}" for k, v in {"run": run, **state}.items())
    page = chromium.open(f"{url}/#influence{keys}")
    page.wait_for(js("DOC && DOC.querySelector('#li-main') && !DOC.querySelector('#li-main .loading')"), timeout=90)
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


def shoot(logdir: Path, out: Path) -> list[Path]:  # long: one screenshot per view, in order
    written = []
    with running_dashboard(logdir) as url, Chromium(width=1400, height=900) as chromium:
        wait_for_scalars(url, DIGITS, "influence/lissa_trace/")
        chosen = most_compared_point(url, DIGITS)
        page = open_run(chromium, url, DIGITS, point=chosen)
        page.wait_for(js(f"DOC.querySelector('#li-point-detail')?.dataset.valIndex === '{chosen}'"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-points.png"))
        page.evaluate(js("DOC.querySelector('#li-compare').scrollIntoView()"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-compare.png", element_clip(page, "#li-compare")))

        train_index = page.evaluate(js("DOC.querySelector('#li-harmful [data-train-index]').dataset.trainIndex"))
        click(page, f"#li-harmful [data-train-index='{train_index}']")
        page.wait_for(js(f"DOC.querySelector('#li-example-detail')?.dataset.trainIndex === '{train_index}'"
                         " && !!DOC.querySelector('#li-classes')"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-examples.png"))

        page = open_run(chromium, url, DIGITS, tab="mislabel")
        page.wait_for(js("DOC.querySelectorAll('#li-candidates tbody tr').length > 0"))
        click(page, "#li-select-disagree")
        page.wait_for(js("!DOC.querySelector('#li-relabel').textContent.includes('(0 selected)')"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-mislabel.png"))

        page = open_run(chromium, url, DIGITS, tab="trust")
        page.wait_for(js("!!DOC.querySelector('#li-trace')"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-trust.png"))

        page = open_run(chromium, url, TEXT)
        page.wait_for(js("DOC.querySelectorAll('#li-harmful .render.text').length > 0"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-text.png"))
        page = open_run(chromium, url, "tabular/version_0")
        page.wait_for(js("DOC.querySelectorAll('#li-harmful .render.tabular').length > 0"))
        settle(page)
        written.append(page.screenshot(out / "dashboard-tabular.png"))

        dark = chromium.open("about:blank")
        dark.send("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark.send("Page.navigate", {"url": f"{url}/#influence&p.influence.run={urllib.parse.quote(DIGITS, safe='')}"})
        dark.wait_for(js("DOC && DOC.documentElement.classList.contains('dark') && !!DOC.querySelector('#li-point-detail')"),
                      timeout=90)
        settle(dark)
        written.append(dark.screenshot(out / "dashboard-dark.png"))
    written.append(shoot_broken(logdir, out))
    return written


def shoot_broken(logdir: Path, out: Path) -> Path:
    """The unreadable-files banner and a missing score shard's note, on copies of the digits run."""
    from helpers.dashboard_broken import broken_runs

    with tempfile.TemporaryDirectory(prefix="dashboard-broken-") as scratch:
        root = broken_runs(logdir / DIGITS, Path(scratch))
        # the digits example saves no scores: an index whose shard is absent, as a DDP run without shared disk leaves
        (root / "missing_shard" / "version_0" / "influence" / "epoch=1-scores.json").write_text(
            json.dumps({"val_indices": [], "train_size": 1400, "shards": ["epoch=1-scores-rank0.pt"]}))
        with running_dashboard(root) as url, Chromium(width=1400, height=900) as chromium:
            page = open_run(chromium, url, "missing_shard/version_0", epoch=1)
            page.wait_for(js("!!DOC.querySelector('#li-unreadable') && !!DOC.querySelector('#li-point-detail')"))
            page.evaluate(js("DOC.querySelector('#li-unreadable').open = true"))
            settle(page)
            return page.screenshot(out / "dashboard-unreadable.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where to write the PNGs")
    parser.add_argument("--logdir", type=Path, help="existing runs digits/, text_classification/, tabular/ (default:"
                                                    " train them)")
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
