#!/usr/bin/env python
"""Does LiSSA's memory grow over its steps? Resident memory and live tensors every 50 steps of one solve.

A 256-512-10 tanh MLP (137k parameters) on 1,000 generated examples, eight test points, damping 1e-4 (a solve that
runs its whole depth: 600 steps, a residual check every 50, the check subset the whole training set, so each check
is the verdict), one thread. Every 50 steps the child records its resident set (``VmRSS``, MiB) and the number of
tensors the garbage collector sees; after the solve, the MiB of tensors its residual memo holds. A leak (a graph
or a history kept alive per step) grows both with the steps; the solution copies the residual memo keeps grow them
only up to its size.

Usage::

    python benchmarks/lissa_memory.py --label now                 # writes benchmarks/lissa-memory-results.json
    python benchmarks/lissa_memory.py --label before --repo DIR   # the same solve with the package in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("lissa-memory-results.json")
STEPS, EVERY, N, POINTS = 600, 50, 1000, 8

CHILD = """
import gc, json, sys
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_influence.config import LissaConfig, ProblemConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

steps, every, n, points = (int(a) for a in sys.argv[1:5])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 10))
x, y = torch.randn(n, 256), torch.randint(0, 10, (n,))
loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
loader = DataLoader(TensorDataset(x, y), batch_size=128)
config = ProblemConfig(solver=LissaConfig(depth=steps, check_every=every, refine=False), damping=1e-4)
rows = []
with analysis_mode(model):
    problem = InfluenceProblem(model, loss, loader, config, store_jacobian=False)
    vectors = problem.gradients((x[:points], y[:points]))
    count = [0]
    def on_step():
        count[0] += 1
        if count[0] % every == 0:
            gc.collect()
            rows.append({"step": count[0], "rss_mib": round(rss(), 1),
                         "tensors": sum(isinstance(o, torch.Tensor) for o in gc.get_objects())})
    result = problem.solve(vectors, on_step)
def held(value):
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(held(v) for v in value)
    return sum(held(v) for v in vars(value).values()) if hasattr(value, "__dataclass_fields__") else 0

memo = sum(held(entry[:2] + entry[3:] if len(entry) > 5 else entry) for entry in problem._residuals._entries)
print(json.dumps({"params": problem.num_params, "residual": result.info.residual, "trace": rows,
                  "memo_entries": len(problem._residuals._entries), "memo_mib": round(memo / 2**20, 2)}))
"""


def measure(repo: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, str(STEPS), str(EVERY), str(N), str(POINTS)],
                          env=env, cwd=str(repo), capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    trace = row["trace"]
    row["rss_growth_mib"] = round(trace[-1]["rss_mib"] - trace[0]["rss_mib"], 1)
    row["tensor_growth_after_step_200"] = trace[-1]["tensors"] - next(r for r in trace if r["step"] == 200)["tensors"]
    row["solution_mib"] = round(POINTS * row["params"] * 4 / 2**20, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the row's name (e.g. before, now)")
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                        help="the checkout whose lightning_influence is measured")
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()
    path = Path(args.json)
    payload = json.loads(path.read_text()) if path.exists() else {
        "setting": f"{STEPS} LiSSA steps, a check every {EVERY}, {N} examples, {POINTS} points, damping 1e-4,"
                   " one thread; resident MiB and live tensors every 50 steps", "rows": {}}
    payload["rows"][args.label] = measure(Path(args.repo))
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps({k: v for k, v in payload["rows"][args.label].items() if k != "trace"}))


if __name__ == "__main__":
    main()
