"""Screenshot the influence outputs in a real TensorBoard with headless Chromium (for docs/images/).

Starts TensorBoard on 127.0.0.1 (a free port) on a log directory, checks over its HTTP API that the
``influence/`` image and text tags are served, then asks Debian's ``chromium`` (``apt-get install -y
chromium``) for PNG screenshots of the images and text dashboards, and stops TensorBoard. Not run in CI.

    python examples/digits.py --log-dir runs
    python scripts/tensorboard_screenshot.py runs/digits/version_0 --out docs/images
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tensorboard_server import influence_outputs, running_tensorboard

DASHBOARDS = {  # file name -> TensorBoard URL fragment
    "tensorboard-images.png": "images&tagFilter=" + urllib.parse.quote("influence/val_"),
    "tensorboard-mislabel.png": "images&tagFilter=" + urllib.parse.quote("influence/mislabel"),
    "tensorboard-text.png": "text&tagFilter=" + urllib.parse.quote("influence/summary"),
}


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("Chromium not found: install it with `apt-get install -y chromium` (Debian/Ubuntu).")


def screenshot(browser: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    """One headless page load of ``url``, JavaScript given ``wait_ms`` of virtual time, saved as a PNG."""
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                   f"--screenshot={path}", url]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=180)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"Chromium failed ({done.returncode}): {done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a TensorBoard log directory with influence/ events")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="where to write the PNGs")
    parser.add_argument("--window-size", default="1400,1000", help="browser window WIDTH,HEIGHT in pixels")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time for TensorBoard's JavaScript")
    parser.add_argument("--min-image-tags", type=int, default=1, help="influence/ image tags to wait for")
    args = parser.parse_args()

    browser = chromium_binary()
    args.out.mkdir(parents=True, exist_ok=True)
    with running_tensorboard(args.logdir) as url:
        outputs = influence_outputs(url, expected_image_tags=args.min_image_tags)
        for run in outputs.runs:
            print(f"{run}: {len(outputs.image_tags.get(run, []))} image tags, {len(outputs.text_tags.get(run, []))}"
                  " text tags under influence/")
        print(f"one image sample: {len(outputs.image_sample)} bytes PNG at step {outputs.image_step}")
        sample = args.out / "tensorboard-image-sample.png"
        sample.write_bytes(outputs.image_sample)  # the grid exactly as TensorBoard serves it, full size
        print(f"wrote {sample}")
        for name, fragment in DASHBOARDS.items():
            screenshot(browser, f"{url}/?darkMode=false#{fragment}", args.out / name, args.window_size, args.wait_ms)
            print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
