"""Reading the dashboard's files so that no single file can break it: errors that name the file and say why.

:class:`BadRequest` is a request parameter that names nothing (HTTP 400); :class:`UnreadableFile` is a report
that cannot be used (truncated, not JSON, missing a required key, a missing score shard: HTTP 422). Both carry a
``hint`` (what to do) that the plugin sends as ``{"error", "hint"}`` JSON. :func:`clean` turns non-finite numbers
into ``None`` so every answer is strict JSON.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

MAX_CACHED_FILES = 16
#: Keys an influence report must have for the dashboard to show it (the rest are optional).
REQUIRED_REPORT_KEYS = ("points",)
REQUIRED_POINT_KEYS = ("val_index", "harmful", "helpful")
REQUIRED_MISLABEL_KEYS = ("candidates",)
REQUIRED_CANDIDATE_KEYS = ("train_index",)


class BadRequest(ValueError):
    """A request parameter that is missing, malformed or names nothing (answered with HTTP 400)."""

    status = 400

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UnreadableFile(BadRequest):
    """A report file the dashboard cannot use (answered with HTTP 422, naming the file and the reason)."""

    status = 422

    def __init__(self, path: Path, reason: str, hint: str | None = None) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"Cannot read {path}: {reason}", hint or (
            "The file may still be being written or copied (wait and reload), or it was cut short or edited by hand:"
            " re-run the analysis (or copy the file again) to replace it."))


def clean(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def check_report(path: Path, report: Any) -> dict[str, Any]:
    """``report`` when it has what the dashboard needs, else :class:`UnreadableFile` saying what is missing."""
    _check_keys(path, report, REQUIRED_REPORT_KEYS, "an influence report")
    if not isinstance(report["points"], list):
        raise UnreadableFile(path, "`points` is not a list")
    for position, point in enumerate(report["points"]):
        _check_keys(path, point, REQUIRED_POINT_KEYS, f"point {position}")
        for kind in ("harmful", "helpful"):
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in point[kind]):
                raise UnreadableFile(path, f"point {position}: `{kind}` is not a list of [train_index, influence]")
    return report


def check_mislabel(path: Path, report: Any) -> dict[str, Any]:
    """``report`` when it is a usable mislabel report, else :class:`UnreadableFile`."""
    _check_keys(path, report, REQUIRED_MISLABEL_KEYS, "a mislabel report")
    if not isinstance(report["candidates"], list):
        raise UnreadableFile(path, "`candidates` is not a list")
    for position, candidate in enumerate(report["candidates"]):
        _check_keys(path, candidate, REQUIRED_CANDIDATE_KEYS, f"candidate {position}")
    return report


def _check_keys(path: Path, value: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(value, dict):
        raise UnreadableFile(path, f"{what} is a JSON {type(value).__name__}, not an object")
    missing = [key for key in keys if key not in value]
    if missing:
        raise UnreadableFile(path, f"{what} has no {', '.join(repr(k) for k in missing)}")


class FileCache:
    """Parsed files keyed by (path, modification time), the most recent ``MAX_CACHED_FILES`` kept."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def json(self, path: Path, check: Callable[[Path, Any], Any] | None = None) -> Any:
        """The parsed JSON of ``path`` (checked by ``check``); :class:`UnreadableFile` when it cannot be used."""
        return self.cached(path, lambda: _load_json(path, check))

    def cached(self, path: Path, load: Callable[[], Any]) -> Any:
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError as err:
            raise UnreadableFile(path, f"it is gone ({err.strerror})", "Reload: the file was removed.") from err
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = load()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > MAX_CACHED_FILES:
                self._cache.popitem(last=False)
        return value


def _load_json(path: Path, check: Callable[[Path, Any], Any] | None) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UnreadableFile(path, f"cannot be read ({err})") from err
    if not text.strip():
        raise UnreadableFile(path, "the file is empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # a string left open runs to the end of the text: the error names where it started, but the file ends in it
        ends_early = err.pos >= len(text.rstrip()) - 1 or err.msg.startswith("Unterminated string")
        where = "it ends too early (truncated)" if ends_early else "it is not valid JSON"
        raise UnreadableFile(path, f"{where}: {err.msg} at line {err.lineno}, column {err.colno}") from err
    return value if check is None else check(path, value)
