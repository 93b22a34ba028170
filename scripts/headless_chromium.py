"""Drive Debian's headless ``chromium`` through the DevTools protocol over a pipe (no Selenium, no websocket).

``chromium --remote-debugging-pipe`` reads protocol messages (JSON, each ended by a NUL byte) on file
descriptor 3 and writes replies and events on descriptor 4. :class:`Chromium` starts it that way;
:meth:`Chromium.open` gives a :class:`Page` to evaluate JavaScript in, wait on, click through and screenshot.
Used by the dashboard's browser tests and ``scripts/dashboard_screenshots.py``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable on PATH (``$CHROMIUM`` first), or None."""
    for name in (os.environ.get("CHROMIUM"), *CANDIDATES):
        if name and (path := shutil.which(name)):
            return path
    return None


class ProtocolError(RuntimeError):
    """A DevTools command that failed, or a JavaScript exception."""


class Chromium:
    """A headless Chromium process and its DevTools pipe; use as a context manager."""

    def __init__(self, executable: str | None = None, width: int = 1400, height: int = 950) -> None:
        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError("No chromium on PATH: run scripts/install_chromium.sh (apt-get install chromium).")
        self.width, self.height = width, height
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The protocol pipe must be descriptors 3 (in) and 4 (out) in the child. Copies at 10 and above keep
        # the dup2s from overwriting each other; every other descriptor Python opened closes on exec (PEP 446).
        read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD_CLOEXEC, 10)
        write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_read)
        os.close(from_browser_write)
        command = [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                   "--force-device-scale-factor=1", f"--window-size={width},{height}",
                   f"--user-data-dir={self._profile}", "about:blank"]
        actions = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, flags, 0)
                   for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY))]
        actions += [(os.POSIX_SPAWN_DUP2, read, 3), (os.POSIX_SPAWN_DUP2, write, 4)]
        try:  # posix_spawn, not fork + preexec_fn: safe in a process with threads (torch, TensorBoard's writer)
            self.pid = os.posix_spawn(executable, command, dict(os.environ), file_actions=actions)
        finally:
            os.close(read)
            os.close(write)
        self._next_id = 0
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the browser may be gone already; it is stopped below anyway
            self.send("Browser.close", timeout=5)
        if not self._wait(10):
            os.kill(self.pid, signal.SIGKILL)
            self._wait(10)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _wait(self, timeout: float) -> bool:
        """Reap the browser process; whether it exited within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0] != 0:
                    return True
            except ChildProcessError:
                return True
            time.sleep(0.1)
        return False

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        target = self._replies.get(message["id"])
                    if target is not None:
                        target.put(message)
                else:
                    self.events.append(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one DevTools command and return its ``result`` (raises :class:`ProtocolError` on an error)."""
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            self._replies[ident] = queue.Queue()
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        try:
            reply = self._replies[ident].get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"No reply to {method} within {timeout} s") from None
        finally:
            with self._lock:
                self._replies.pop(ident, None)
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> Page:
        """A new tab showing ``url`` (the viewport is ``width`` x ``height`` CSS pixels)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        page.send("Page.enable")
        page.send("Page.navigate", {"url": url})
        return page

    def allow_downloads(self, directory: Path) -> None:
        """Save downloads (e.g. a link with ``download``) into ``directory``."""
        self.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(directory),
                                                  "eventsEnabled": True})


class Page:
    """One tab: evaluate JavaScript, wait for a condition, take screenshots."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.send(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The JSON value of ``expression`` (awaited when it is a promise); JavaScript errors raise."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                           timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ProtocolError(f"JavaScript error in {expression[:80]!r}: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.2) -> Any:
        """Poll ``expression`` until it is truthy; return its value (raises TimeoutError with the last value)."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except ProtocolError as err:  # e.g. the frame is not there yet
                value = str(err)
            else:
                if value:
                    return value
            time.sleep(interval)
        raise TimeoutError(f"{expression[:120]!r} stayed falsy for {timeout} s (last value: {value!r})")

    def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> Path:
        """Save the viewport (or the ``clip`` rectangle ``{x, y, width, height}`` in CSS pixels) as a PNG."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
