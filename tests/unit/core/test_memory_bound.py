"""The documented memory bound (docs/core.md, "Scoring and memory"): peak memory grows with parameters x test
vectors as stated. ``benchmarks/memory.py`` measures the resident-set high-water mark of forked children and
fits the factors; this test runs it and checks them against the documented ranges.

Differences between two sizes cancel the constant part (the interpreter, torch, data, the model). Factors are
in float32 parameter vectors (``4 * P`` bytes); the ranges are wide enough for allocator noise (measured values
are in benchmarks/memory-results.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and fork")]

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def factors() -> dict[str, float]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py")], cwd=ROOT, env=environment,
                         capture_output=True, text=True, timeout=900, check=True)
    return json.loads(run.stdout.splitlines()[-1])["factors"]


def test_lissa_holds_a_few_copies_of_the_k_by_p_block(factors):
    assert 4 <= factors["lissa_per_vector_from_params"] <= 24
    assert 4 <= factors["lissa_per_vector_from_vectors"] <= 24


def test_damping_auto_holds_its_lanczos_basis(factors):
    assert 8 <= factors["damping_auto_vectors"] <= 30  # TOP_EIGENVALUE_STEPS = 10 basis vectors and a few more


def test_scoring_holds_about_one_copy_of_the_test_vectors_whatever_the_training_set_size(factors):
    assert 0.5 <= factors["scoring_per_vector"] <= 4
    assert factors["scoring_growth_4x_data_in_kP"] < 1  # streamed: 4x the data, less than one k x P more
