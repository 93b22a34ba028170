#!/usr/bin/env python
"""Peak resident memory of the s_test solve and of scoring, measured in forked children of one process.

``python benchmarks/memory.py [--json benchmarks/memory-results.json]`` prints one JSON line per measurement,
``{"what", "width", "params", "vectors", "n_train", "extra_bytes"}``, then the fitted factors (in float32
parameter vectors, ``4 P`` bytes) that docs/core.md quotes; tests/unit/core/test_memory_bound.py runs it and
checks the factors against the documented ranges. About 1-3 minutes on 2 shared cores. Each measurement runs in a child forked
after the imports and data set-up, so it starts from the same resident set; ``extra_bytes`` is the child's
high-water resident set (``ru_maxrss``) minus its resident set just before the measured call. Torch's CPU
tensors come from malloc, which tracemalloc does not see; the resident set does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.config import LissaConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode

#: (what, hidden width, test vectors, training examples): widths 448 and 896 give 234,762 and 870,922 parameters.
CASES = [("damping", 448, 8, 256), ("damping", 896, 8, 256), ("lissa", 448, 8, 256), ("lissa", 896, 8, 256),
         ("lissa", 896, 1, 256), ("lissa", 896, 16, 256), ("scoring", 448, 8, 2048), ("scoring", 896, 8, 2048),
         ("scoring", 896, 8, 8192)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(what: str, width: int, vectors: int, n_train: int) -> dict:
    """One measurement with the package defaults except a short LiSSA (depth 3, the series alone: no CG
    refinement) and, for ``"lissa"`` and ``"scoring"``, a fixed damping (``"damping"`` measures the
    ``damping="auto"`` spectrum estimate alone)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    x, y = torch.randn(n_train, 64), torch.randint(0, 10, (n_train,))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    damping = "auto" if what == "damping" else 0.1
    problem = InfluenceProblem(model, _loss, train, damping, LissaConfig(depth=3, batch_size=32, refine=False),
                               store_jacobian=False)  # the autograd products; the stored Jacobian has its own budget
    with analysis_mode(model):
        v = problem.gradients((x[:vectors], y[:vectors]))
        before = _resident()
        if what == "damping":
            _ = problem.damping  # damping="auto": the spectrum estimate runs here
        elif what == "lissa":
            problem.solve(v)
        else:
            for _ in problem.scores(v):
                pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"what": what, "width": width, "params": problem.num_params, "vectors": vectors, "n_train": n_train,
            "extra_bytes": peak - before}


def run_cases() -> list[dict]:
    records = []
    for case in CASES:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child measures one case from the parent's resident set, reports, and exits
            os.close(read)
            try:
                os.write(write, json.dumps(measure(*case)).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            line = pipe.read()
        os.waitpid(child, 0)
        print(line, flush=True)
        records.append(json.loads(line))
    return records


def factors(records: list[dict]) -> dict[str, float]:
    """Extra peak bytes per float32 parameter vector: per test vector (LiSSA, scoring) or in all (damping)."""
    peaks = {(r["what"], r["width"], r["vectors"], r["n_train"]): r for r in records}

    def slope(small: tuple, large: tuple) -> float:
        a, b = peaks[small], peaks[large]
        return (b["extra_bytes"] - a["extra_bytes"]) / (4 * (b["params"] - a["params"]))

    lissa_1, lissa_16 = peaks[("lissa", 896, 1, 256)], peaks[("lissa", 896, 16, 256)]
    scoring_small, scoring_large = peaks[("scoring", 896, 8, 2048)], peaks[("scoring", 896, 8, 8192)]
    return {
        "lissa_per_vector_from_params": slope(("lissa", 448, 8, 256), ("lissa", 896, 8, 256)) / 8,
        "lissa_per_vector_from_vectors": (lissa_16["extra_bytes"] - lissa_1["extra_bytes"]) / (15 * 4 * lissa_16["params"]),
        "damping_auto_vectors": slope(("damping", 448, 8, 256), ("damping", 896, 8, 256)),
        "scoring_per_vector": slope(("scoring", 448, 8, 2048), ("scoring", 896, 8, 2048)) / 8,
        "scoring_growth_4x_data_in_kP": (scoring_large["extra_bytes"] - scoring_small["extra_bytes"])
        / (8 * 4 * scoring_large["params"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--json", help="also write the measurements and factors here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before, started = os.getloadavg(), time.perf_counter()
    records = run_cases()
    fitted = factors(records)
    print(json.dumps({"factors": fitted}), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"torch": torch.__version__, "cpu_count": os.cpu_count(), "load_before": load_before,
                       "load_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started,
                       "measurements": records, "factors": fitted}, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
