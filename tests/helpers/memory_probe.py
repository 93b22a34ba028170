"""Peak resident memory of the s_test solve and of scoring, measured in forked children of one process.

Run as ``python -m helpers.memory_probe`` (from ``tests/``): prints one JSON line per measurement,
``{"what", "width", "params", "vectors", "n_train", "extra_bytes"}``. Each measurement runs in a child forked
after the imports and data set-up, so it starts from the same resident set; ``extra_bytes`` is the child's
high-water resident set (``ru_maxrss``) minus its resident set just before the measured call. Torch's CPU
tensors come from malloc, which tracemalloc does not see; the resident set does.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.config import LissaConfig
from lightning_influence.core.modes import analysis_mode
from lightning_influence.core.problem import InfluenceProblem

#: (what, hidden width, test vectors, training examples): widths 448 and 896 give 234,762 and 870,922 parameters.
CASES = [("damping", 448, 8, 256), ("damping", 896, 8, 256), ("lissa", 448, 8, 256), ("lissa", 896, 8, 256),
         ("lissa", 896, 1, 256), ("lissa", 896, 16, 256), ("scoring", 448, 8, 1024), ("scoring", 896, 8, 1024),
         ("scoring", 896, 8, 4096)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(what: str, width: int, vectors: int, n_train: int) -> dict:
    """One measurement with the package defaults except a short LiSSA (depth 3) and, for ``"lissa"`` and
    ``"scoring"``, a fixed damping (``"damping"`` measures the ``damping="auto"`` spectrum estimate alone)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    x, y = torch.randn(n_train, 64), torch.randint(0, 10, (n_train,))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    damping = "auto" if what == "damping" else 0.1
    problem = InfluenceProblem(model, _loss, train, damping, LissaConfig(depth=3, batch_size=32))
    with analysis_mode(model):
        v = problem.gradients((x[:vectors], y[:vectors]))
        before = _resident()
        if what == "damping":
            problem.damping
        elif what == "lissa":
            problem.solve(v)
        else:
            for _ in problem.scores(v):
                pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"what": what, "width": width, "params": problem.num_params, "vectors": vectors, "n_train": n_train,
            "extra_bytes": peak - before}


def main() -> None:
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    sys.exit(main())
