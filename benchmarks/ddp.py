#!/usr/bin/env python
"""Time of ``explain()``'s s_test and scoring on 1 and on 2 ranks (plain torch.distributed, gloo, CPU).

On scikit-learn's digits (1,400 training images, float32) with a small tanh CNN (about 2.5k parameters,
trained here for a few epochs with weight decay 1e-3), 8 monitored validation points, LiSSA depth 1000 with
the default minibatch size and ``scale="auto"``, damping 1e-2. Each world size runs in fresh processes started
by ``torch.multiprocessing.spawn``; every rank calls :func:`lightning_influence.analysis.explain.explain` with
:class:`~lightning_influence.distributed.TorchDistributed` collectives, once as a warm-up (first-call
imports) and once timed. The figures are rank 0's ``Explanation.timings``:

* ``s_test``: the automatic scale estimate (its probe minibatches split over ranks; also timed apart in one process),
  each rank's share of the LiSSA repeats (rank r runs repeats r, r + R, ...), one all-reduce of the partial sums,
  and the residual check of the average (split over ranks; also timed apart);
* ``scoring``: each rank scores every R-th training example, then the top-k lists are gathered and merged.

Every rank is pinned to one thread, the 1-rank run too, so the comparison is 1 core against 2 cores and
not thread count against process count (on a 2-core machine 2 ranks with more threads would oversubscribe).

Usage::

    python benchmarks/ddp.py                      # repeats 4, depth 1000, 1 and 2 ranks
    python benchmarks/ddp.py --repeats 2 --json out.json
    python benchmarks/ddp.py --model mlp --depth 100 --repeats 2 --train-epochs 2 --json benchmarks/ddp-mlp-results.json
    python benchmarks/ddp.py --derive --json benchmarks/ddp-mlp-results.json   # add the printed speed-ups, no run

``--model mlp`` runs the 1.13M-parameter MLP of the issue's s_test table (without the self-diagnosis). Besides
wall seconds it records rank 0's process CPU seconds for the whole ``explain()``: on a machine shared with
other jobs the wall clock shows how many cores the ranks got, the CPU seconds how much work each rank did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and in the spawned ranks
os.environ["MKL_NUM_THREADS"] = "1"

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.analysis.explain import explain
from lightning_influence.config import ExplainConfig, LissaConfig, ProblemConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.distributed import TorchDistributed

DAMPING = 1e-2
NUM_POINTS = 8
TOP_K = 10
N_TRAIN = 1400


def mlp() -> nn.Module:
    """The 64-1024-1024-10 tanh MLP of benchmarks/scoring.py and the issue's s_test table: 1,126,410 parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(),
                         nn.Linear(1024, 10))


MODELS = {"cnn": lambda: small_cnn(), "mlp": lambda: mlp()}


def small_cnn() -> nn.Module:
    """The digits example's CNN (examples/digits.py) without Lightning: about 2.5k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


def per_example_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def digits_split() -> tuple[TensorDataset, TensorDataset]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:N_TRAIN], order[N_TRAIN:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def train_model(epochs: int, name: str = "cnn") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]()
    train, _ = digits_split()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(epochs):
        for batch in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            per_example_loss(model, batch).mean().backward()
            optimizer.step()
    return model.state_dict()


def rank_main(rank: int, world_size: int, port: int, state: dict, config: LissaConfig, out: str,
              name: str = "cnn") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=5))
    try:
        model = MODELS[name]()
        model.load_state_dict(state)
        train, val = digits_split()
        train_data, val_data = IndexedData(train), IndexedData(val)
        settings = ExplainConfig(top_k=TOP_K, num_worst=NUM_POINTS, diagnose=name == "cnn")  # MLP: s_test only
        warm_up = LissaConfig(depth=5, repeats=world_size, batch_size=config.batch_size, seed=config.seed)
        explain(model, per_example_loss, train_data, val_data, ProblemConfig(solver=warm_up, damping=DAMPING), settings,
                TorchDistributed())
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = explain(model, per_example_loss, train_data, val_data, ProblemConfig(solver=config, damping=DAMPING), settings,
                         TorchDistributed())
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if rank == 0:
            problem = InfluenceProblem(model, per_example_loss, train_data.loader(), DAMPING, config)
            with analysis_mode(model):
                start = time.perf_counter()
                _ = problem.solver.scale  # cached property read, timed: the part of s_test that every rank repeats (not split)
                scale_seconds = time.perf_counter() - start
                gradients = problem.gradients(val_data.fetch([p.val_index for p in result.points]))
                start = time.perf_counter()
                problem.residual(gradients, gradients)  # the final residual check, also on every rank
                residual_seconds = time.perf_counter() - start
            record = {
                "world_size": world_size,
                "timings": result.timings,
                "total": total,
                "explain_cpu_seconds": cpu,  # rank 0's process CPU time: what the split saves, whatever the load
                "scale_seconds": scale_seconds,
                "residual_seconds": residual_seconds,
                "iterations": result.solver.iterations,
                "parameters": sum(p.numel() for p in model.parameters()),
                "scale": result.solver.scale,
                "val_indices": [p.val_index for p in result.points],
                "harmful": [[i.train_index for i in p.harmful] for p in result.points],
                "helpful": [[i.train_index for i in p.helpful] for p in result.points],
            }
            Path(out).write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world_size: int, state: dict, config: LissaConfig, name: str = "cnn") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(rank_main, args=(world_size, free_port(), state, config, out, name), nprocs=world_size, join=True)
        return json.loads(Path(out).read_text())


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", 1-min load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()} {platform.system()}, {cores} usable CPU cores (os.cpu_count()={os.cpu_count()})"
            f"{load}; python {platform.python_version()}, torch {torch.__version__}, gloo backend")


def speedups(base: dict, result: dict) -> dict:
    """Ratios of the baseline's figures to ``result``'s: s_test and scoring wall, whole explain() wall, rank 0's CPU."""
    ratios = {k: base["timings"][k] / result["timings"][k] for k in ("s_test", "scoring")}
    ratios["explain"] = base["total"] / result["total"]
    ratios["explain_cpu"] = base["explain_cpu_seconds"] / result["explain_cpu_seconds"]
    return {"ranks": [base["world_size"], result["world_size"]], **{k: round(v, 2) for k, v in ratios.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=LissaConfig().batch_size, help="LiSSA minibatch B")
    parser.add_argument("--ranks", default="1,2", help="comma-separated world sizes; the first is the baseline")
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--model", choices=tuple(MODELS), default="cnn",
                        help="cnn: the digits example's CNN (~2.5k params); mlp: the 64-1024-1024-10 MLP (1.13M)")
    parser.add_argument("--derive", action="store_true",
                        help="add the printed speed-ups (rounded ratios) to an existing --json file, no run")
    args = parser.parse_args()
    if args.derive:
        payload = json.loads(Path(args.json).read_text())
        payload["speedup"] = [speedups(payload["results"][0], r) for r in payload["results"][1:]]
        Path(args.json).write_text(json.dumps(payload, indent=2))
        return
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    config = LissaConfig(depth=args.depth, repeats=args.repeats, batch_size=args.batch_size, seed=0)
    print(f"machine: {machine()}")
    print("threads: 1 per rank (torch.set_num_threads(1), OMP_NUM_THREADS=1), the 1-rank run included, so R ranks"
          " use R cores; on a 2-core machine 2 ranks are the most that do not oversubscribe.")
    model_name = "small CNN (~2.5k params" if args.model == "cnn" else "MLP 64-1024-1024-10 (1.13M params"
    print(f"problem: digits, {N_TRAIN} training examples, {model_name}, float32), {NUM_POINTS} monitored"
          f" points, LiSSA depth {config.depth} x {config.repeats} repeats, batch {config.batch_size}, scale auto,"
          f" damping {DAMPING}")
    state = train_model(args.train_epochs, args.model)
    results = [run(int(r), state, config, args.model) for r in args.ranks.split(",")]

    print(f"\n{'ranks':>5} {'s_test s':>9} {'of which scale':>15} {'residual':>9} {'scoring s':>10} {'explain s':>10}"
          f" {'scale':>8}")
    for r in results:
        t = r["timings"]
        print(f"{r['world_size']:>5} {t['s_test']:>9.2f} {r['scale_seconds']:>15.2f} {r['residual_seconds']:>9.2f}"
              f" {t['scoring']:>10.3f} {r['total']:>10.2f} {r['scale']:>8.3f}")
    print("('of which scale' and 'residual': the scale='auto' estimate and the final residual check of the averaged"
          " s_test, each timed apart on rank 0 in one process after the run; inside s_test both are split over ranks)")
    base = results[0]
    for r in results[1:]:
        ratio = speedups(base, r)
        same = (r["val_indices"], r["harmful"], r["helpful"]) == (base["val_indices"], base["harmful"], base["helpful"])
        print(f"speed-up {base['world_size']} -> {r['world_size']} ranks: s_test {ratio['s_test']:.2f}x,"
              f" scoring {ratio['scoring']:.2f}x, whole explain() {ratio['explain']:.2f}x, rank 0's"
              f" CPU seconds {ratio['explain_cpu']:.2f}x;"
              f" same points and top-{TOP_K} lists: {'yes' if same else 'NO'}")
    if args.json:
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        settings = {"model": args.model, "depth": config.depth, "repeats": config.repeats,
                    "batch_size": config.batch_size, "damping": DAMPING, "points": NUM_POINTS, "n_train": N_TRAIN}
        Path(args.json).write_text(json.dumps({"machine": machine(), "settings": settings, "load_before": load_before,
                                               "load_after": load_after, "results": results,
                                               "speedup": [speedups(base, r) for r in results[1:]]}, indent=2))


if __name__ == "__main__":
    main()
