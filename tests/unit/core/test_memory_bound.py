"""The documented memory bound (docs/core.md, "Scoring and memory"): peak memory grows with parameters x test
vectors as stated, measured as the resident-set high-water mark of forked children (``helpers.memory_probe``).

Differences between two sizes cancel the constant part (the interpreter, torch, data, the model); the factors
checked are the documented ranges, in float32 parameter-vectors ``4 * P`` bytes, wide enough for allocator
noise (measured values in the comments, 2 cores shared with other jobs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and fork")]

TESTS = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peaks() -> dict[tuple[str, int, int, int], dict]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "helpers.memory_probe"], cwd=TESTS, env=environment,
                         capture_output=True, text=True, timeout=600, check=True)
    records = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {(r["what"], r["width"], r["vectors"], r["n_train"]): r for r in records}


def _copies(peaks, small, large) -> float:
    """Extra peak bytes of ``large`` over ``small`` in units of ``4 * (P_large - P_small)`` bytes."""
    a, b = peaks[small], peaks[large]
    return (b["extra_bytes"] - a["extra_bytes"]) / (4 * (b["params"] - a["params"]))


def test_lissa_holds_a_few_copies_of_the_k_by_p_block(peaks):
    per_params = _copies(peaks, ("lissa", 448, 8, 256), ("lissa", 896, 8, 256)) / 8  # measured 14.2
    assert 4 <= per_params <= 24
    small, large = peaks[("lissa", 896, 1, 256)], peaks[("lissa", 896, 16, 256)]
    per_vector = (large["extra_bytes"] - small["extra_bytes"]) / (15 * 4 * large["params"])  # measured 9.5
    assert 4 <= per_vector <= 24


def test_damping_auto_holds_its_lanczos_basis(peaks):
    assert 25 <= _copies(peaks, ("damping", 448, 8, 256), ("damping", 896, 8, 256)) <= 60  # 30 steps; measured 38


def test_scoring_holds_about_one_copy_of_the_test_vectors_whatever_the_training_set_size(peaks):
    assert 0.5 <= _copies(peaks, ("scoring", 448, 8, 1024), ("scoring", 896, 8, 1024)) / 8 <= 4  # measured 1.1-2
    small, large = peaks[("scoring", 896, 8, 1024)], peaks[("scoring", 896, 8, 4096)]
    assert large["extra_bytes"] - small["extra_bytes"] < 8 * 4 * large["params"]  # streamed: 4x the data, < kP more
