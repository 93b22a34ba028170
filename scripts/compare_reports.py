"""Compare the influence reports of two runs: identical apart from wall-clock times.

Usage: ``python scripts/compare_reports.py RUN_DIR_A RUN_DIR_B`` where each is a log directory with an
``influence/`` folder (e.g. ``runs/digits/version_0``). Used to check that a refactoring leaves the digits
example's answers unchanged. Exit status 0 when every JSON report matches, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: Keys whose values are wall-clock measurements (differ between any two runs).
TIMING_KEYS = {"seconds", "timings"}


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ (first 20)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for key in sorted(set(a) & set(b)):
            out += differences(a[key], b[key], f"{path}/{key}")
        return out[:20]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")][:20]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def compare(run_a: Path, run_b: Path) -> list[str]:
    files_a = sorted(p.name for p in (run_a / "influence").glob("*.json"))
    files_b = sorted(p.name for p in (run_b / "influence").glob("*.json"))
    problems = [f"report files differ: {files_a} vs {files_b}"] if files_a != files_b else []
    for name in sorted(set(files_a) & set(files_b)):
        a = without_timings(json.loads((run_a / "influence" / name).read_text()))
        b = without_timings(json.loads((run_b / "influence" / name).read_text()))
        problems += [f"{name}{d}" for d in differences(a, b)]
    return problems


def main() -> int:
    run_a, run_b = (Path(arg) for arg in sys.argv[1:3])
    problems = compare(run_a, run_b)
    for line in problems:
        print(line)
    print("identical (apart from timings)" if not problems else f"{len(problems)} difference(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
