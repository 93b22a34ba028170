"""Run a real ``tensorboard`` that shows the Influence tab (used by the dashboard tests and screenshot script).

TensorBoard finds the plugin through the ``tensorboard_plugins`` entry point in this package's installed
metadata. When the installed metadata lacks it (a source checkout that was installed before the entry point
existed, or not installed at all) :func:`running_dashboard` writes a minimal ``*.dist-info`` holding exactly
the entry points of ``pyproject.toml`` into a temporary directory on the server's ``PYTHONPATH``: the same
discovery TensorBoard does after ``pip install``, with no flag.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tensorboard_server import get_json, running_tensorboard

ROOT = Path(__file__).resolve().parents[1]
GROUP = "tensorboard_plugins"


def declared_entry_points() -> dict[str, str]:
    """``{name: "module:attr"}`` of the ``tensorboard_plugins`` group in ``pyproject.toml``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(project.get("entry-points", {}).get(GROUP, {}))


def installed_entry_points() -> dict[str, str]:
    """``{name: value}`` of the ``tensorboard_plugins`` entry points the Python environment already has."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}


def _dist_info(directory: Path, entry_points: dict[str, str]) -> None:
    info = directory / "lightning_influence_dashboard_checkout-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lightning-influence-dashboard-checkout\nVersion: 0.0\n")
    lines = [f"[{GROUP}]"] + [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def running_dashboard(logdir: Path, startup_timeout: float = 120.0) -> Iterator[str]:
    """Yield the base URL of ``tensorboard --logdir logdir`` on 127.0.0.1; stop it on exit."""
    declared = declared_entry_points()
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    with tempfile.TemporaryDirectory(prefix="dashboard-entry-points-") as shim:
        if any(installed_entry_points().get(name) != value for name, value in declared.items()):
            _dist_info(Path(shim), declared)
            paths.insert(0, shim)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        with running_tensorboard(logdir, startup_timeout, env=env, ready_path="/data/plugins_listing") as url:
            yield url


def wait_for_scalars(url: str, run: str, prefix: str, timeout: float = 60.0) -> None:
    """Wait until TensorBoard has loaded a scalar tag of ``run`` starting with ``prefix`` (event files load
    in the background after start-up)."""
    deadline = time.monotonic() + timeout
    while True:
        tags = get_json(f"{url}/data/plugin/scalars/tags").get(run, {})
        if any(tag.startswith(prefix) for tag in tags):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"TensorBoard on {url} has no scalar tag {prefix}* for run {run!r} after {timeout} s")
        time.sleep(0.5)
