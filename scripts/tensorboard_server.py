"""Run TensorBoard on a log directory and read its HTTP data API (used by a test and the screenshot script).

``running_tensorboard(logdir)`` starts ``tensorboard --logdir ... --host 127.0.0.1 --port <free>`` as a child
process, waits until it answers, and always stops it. ``influence_outputs(url)`` lists the image and text
tags under ``influence/`` per run and fetches one sample of each, proving the outputs render there.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def get_json(url: str, timeout: float = 10.0) -> Any:
    return json.loads(get(url, timeout).decode("utf-8"))


@contextlib.contextmanager
def running_tensorboard(logdir: Path, startup_timeout: float = 90.0, env: dict[str, str] | None = None,
                        ready_path: str = "/data/runs") -> Iterator[str]:
    """Yield the base URL of a TensorBoard serving ``logdir`` (started with ``env``, ready once ``ready_path``
    answers); stop it (terminate, then kill) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                output = process.stdout.read() if process.stdout is not None else ""
                raise RuntimeError(f"TensorBoard exited with status {process.returncode}:\n{output}")
            try:
                get_json(f"{url}{ready_path}", timeout=2.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"TensorBoard did not answer on {url} within {startup_timeout} s") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@dataclass
class InfluenceOutputs:
    """What TensorBoard serves under ``influence/``: tags per run and one decoded sample of each kind."""

    runs: list[str]
    image_tags: dict[str, list[str]] = field(default_factory=dict)
    text_tags: dict[str, list[str]] = field(default_factory=dict)
    image_sample: bytes = b""
    image_step: int = -1
    text_sample: str = ""


def influence_outputs(url: str, expected_image_tags: int = 1, timeout: float = 60.0) -> InfluenceOutputs:
    """Poll the images and text plugins until ``expected_image_tags`` ``influence/`` image tags are loaded."""
    deadline = time.monotonic() + timeout
    while True:
        images = get_json(f"{url}/data/plugin/images/tags")
        texts = get_json(f"{url}/data/plugin/text/tags")
        image_tags = {run: sorted(t for t in tags if t.startswith("influence/")) for run, tags in images.items()}
        text_tags = {run: sorted(t for t in tags if t.startswith("influence/")) for run, tags in texts.items()}
        if sum(map(len, image_tags.values())) >= expected_image_tags and any(text_tags.values()):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"TensorBoard on {url} listed only image tags {image_tags} after {timeout} s")
        time.sleep(1.0)
    outputs = InfluenceOutputs(sorted(get_json(f"{url}/data/runs")), image_tags, text_tags)
    run, tag = next((run, tags[0]) for run, tags in image_tags.items() if tags)
    query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
    entries = get_json(f"{url}/data/plugin/images/images?{query}")
    outputs.image_step = int(entries[-1]["step"])
    outputs.image_sample = get(f"{url}/data/plugin/images/individualImage?{entries[-1]['query']}")
    run, tag = next((run, min(tags, key=lambda t: not t.startswith("influence/val_")))
                    for run, tags in text_tags.items() if tags)  # a point's table when there is one
    text = get_json(f"{url}/data/plugin/text/text?{urllib.parse.urlencode({'run': run, 'tag': tag})}")
    outputs.text_sample = text[-1]["text"]
    return outputs
