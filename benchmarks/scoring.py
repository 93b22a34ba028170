#!/usr/bin/env python
"""Cost of scoring the training set and of one LiSSA s_test, against one plain training epoch.

On scikit-learn's digits (1,500 training images, float32, CPU) for two models: a small tanh CNN and a ~1.1M
parameter MLP. For each model it measures, every figure in a fresh subprocess (so peak memory is that
configuration's own):

* one training epoch (AdamW, weight decay 1e-3, batch 64, shuffled): median of 3 epochs after a warm-up;
* (a) scoring all training examples against 8 test vectors with ``InfluenceProblem.scores`` for
  ``method`` in {factored, jvp, per_example_grad, auto} and chunk sizes {256, 1500} (the loader's batch size is the
  chunk size), as seconds and as a ratio to the epoch, plus the max relative disagreement between methods;
* (b) one ``s_test`` (LiSSA, depth 1000, damping 1e-2) with the default minibatch size and with 32 and 1,
  including the automatic scale estimate (also timed on its own);
* (c) the peak resident memory of each run above the process's resident memory after the model was built.

Usage::

    python benchmarks/scoring.py                 # full run (6-15 minutes on a 2-vCPU VM, more when it is busy)
    python benchmarks/scoring.py --quick         # smoke run (300 examples, depth 20; about 2 minutes)
    python benchmarks/scoring.py --json out.json # also write every figure as JSON
    python benchmarks/scoring.py --profile       # also: where the scoring time goes, path by path
    python benchmarks/scoring.py --threads 2     # torch threads (default 1; see docs/benchmarks.md)

Most of a run is spent in LiSSA (depth 1000, six solves) and in starting one Python process per figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("factored", "jvp", "per_example_grad", "auto")
CHUNKS = (256, 1500)
STEST_BATCHES = (None, 32, 1)  # None = LissaConfig's default batch_size
NUM_VECTORS = 8
DAMPING = 1e-2
TARGET_RATIO = 1.5
#: OpenMP's default active spin-wait made 2 threads 9-40x slower than 1 on small ops on the 2-vCPU VM this was
#: written on (tanh of 64x1024: 8 ms instead of 0.2 ms); passive waiting removes that. Override by setting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: What "seconds" means: process CPU time (user + sys) when single-threaded, so that other jobs on a shared
#: machine do not inflate the figures (on an idle machine it equals wall time); wall time with more threads.
CLOCK = {"name": "cpu", "now": time.process_time}


def clock() -> float:
    return CLOCK["now"]()


def set_threads(threads: int) -> None:
    if threads == 1:
        CLOCK.update(name="cpu", now=time.process_time)
    else:
        CLOCK.update(name="wall", now=time.perf_counter)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# -- data and models ------------------------------------------------------------------------------------------
def digits(n_train: int):
    """Digits images ``/16`` as float32 ``[N, 1, 8, 8]``: the first ``n_train`` for training, the rest held out."""
    import torch
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.long)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def build_model(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Tanh(),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
        )
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10)
        )
    raise ValueError(name)


def loss_fn(model, batch):
    import torch.nn.functional as F

    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets, reduction="none")


def train_loader(x, y, batch_size: int, shuffle: bool, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def run_epoch(model, optimizer, loader) -> float:
    """One plain training epoch (forward, mean loss, backward, step over every batch); returns seconds."""
    import torch.nn.functional as F

    model.train()
    start = clock()
    for inputs, targets in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    return clock() - start


def make_optimizer(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)


def s_vectors(num_params: int, k: int):
    """``k`` random vectors of norm about 1 (scoring cost does not depend on how s_test was obtained)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    return torch.randn(k, num_params, generator=generator) / num_params**0.5


# -- memory -----------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory above the current resident memory, from now on.

    On Linux the high-water mark is reset through ``/proc/self/clear_refs`` so the peak is this section's
    own; elsewhere ``ru_maxrss`` (monotone, so the figure is a lower bound if an earlier peak was higher).
    """

    def __init__(self) -> None:
        gc.collect()
        self.reset = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            pass
        self.base_kib = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mib(self) -> float:
        hwm = _status_kib("VmHWM") if self.reset else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(0.0, (hwm - self.base_kib) / 1024)


# -- one configuration (run in its own process) ---------------------------------------------------------------
def run_one(config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import torch

    from lightning_influence import LissaDivergenceError, s_test
    from lightning_influence.config import LissaConfig
    from lightning_influence.core import InfluenceProblem
    from lightning_influence.core.per_example.factored import factored_layers
    from lightning_influence.core.scoring import PER_EXAMPLE_BUDGET, resolve_method
    from lightning_influence.core.tensors.modes import analysis_mode

    (x, y), (x_test, y_test) = digits(config["n_train"])
    model = build_model(config["model"])
    model.load_state_dict(torch.load(workdir / f"{config['model']}.pt"))
    num_params = sum(p.numel() for p in model.parameters())
    kind = config["kind"]
    result: dict[str, Any] = {}
    wall, cpu = time.perf_counter(), time.process_time()

    if kind == "epoch":
        loader = train_loader(x, y, 64, shuffle=True, seed=2)
        optimizer = make_optimizer(model)
        memory = PeakRSS()
        times = [run_epoch(model, optimizer, loader) for _ in range(1 + config["repeats"])]
        result.update(seconds=statistics.median(times[1:]), all_seconds=times, peak_mib=memory.peak_mib())

    elif kind == "score":
        chunk = config["chunk"]
        loader = train_loader(x, y, chunk, shuffle=False)
        s = s_vectors(num_params, config["k"])
        problem = InfluenceProblem(model, loss_fn, loader, DAMPING, LissaConfig())
        memory = PeakRSS()
        times = []
        for _ in range(1 + config["repeats"]):  # the first (cold) run is reported apart
            start = clock()
            with analysis_mode(model):
                blocks = [block for block in problem.scores(s, method=config["method"], chunk_size=chunk)]
            times.append(clock() - start)
        resolved = resolve_method(config["method"], num_params,
                                  factorable=factored_layers(model, problem.params) is not None)
        effective = min(chunk, PER_EXAMPLE_BUDGET // num_params) if resolved == "per_example_grad" else chunk
        result.update(seconds=statistics.median(times[1:]), cold_seconds=times[0], all_seconds=times,
                      peak_mib=memory.peak_mib(), resolved=resolved, effective_chunk=effective)
        torch.save(torch.cat(blocks, dim=1), workdir / config["save"])

    elif kind == "stest":
        loader = train_loader(x, y, 64, shuffle=True)
        options = {"depth": config["depth"]}
        if config["batch_size"] is not None:
            options["batch_size"] = config["batch_size"]
        test_point = (x_test[:1], y_test[:1])
        memory = PeakRSS()
        # One-time lazy initialisation (torch.func, autograd, the loader) costs about a second on the first
        # call in a process: pay it with a one-step, fixed-scale solve and report it apart.
        start = clock()
        s_test(model, loss_fn, loader, test_point, solver="lissa", damping=DAMPING, **{**options, "depth": 1,
                                                                                       "scale": 1e3})
        first_call = clock() - start
        start = clock()
        try:
            st = s_test(model, loss_fn, loader, test_point, solver="lissa", damping=DAMPING, **options)
            diverged = None
        except LissaDivergenceError as error:
            st, diverged = None, str(error)
        seconds = clock() - start
        peak = memory.peak_mib()
        # The automatic scale estimate on its own (same probe minibatches), to split the total.
        problem = InfluenceProblem(model, loss_fn, loader, DAMPING, LissaConfig(**options))
        start = clock()
        with analysis_mode(model):
            scale = problem.solver.scale
        scale_seconds = clock() - start
        result.update(seconds=seconds, scale_seconds=scale_seconds, first_call_overhead=first_call, peak_mib=peak,
                      scale=scale, diverged=diverged, converged=bool(st and st.info.converged),
                      final_update=float(st.info.trace[0, -1]) if st else float("nan"),
                      batch_size=options.get("batch_size", LissaConfig().batch_size))
    else:
        raise ValueError(kind)
    result["num_params"] = num_params
    # Share of the wall time this process was on a CPU (single-threaded: about 1 on an idle machine).
    result["cpu_share"] = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
    result["clock"] = CLOCK["name"]
    return result


def spawn(config: dict[str, Any], workdir: Path, threads: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter (with extra ``env``); returns its result dict."""
    command = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(config), "--workdir", str(workdir),
               "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- profiling (optional) -------------------------------------------------------------------------------------
def bench(fn, reps: int = 5) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def profile(workdir: Path, n_train: int, epochs: dict[str, float]) -> dict[str, Any]:
    """Where the scoring time goes: pieces of each path, chunk sizes, a loop vs vmap, and the factored path."""
    data, _ = digits(n_train)
    return {name: profile_model(name, epoch, data, workdir) for name, epoch in epochs.items()}


def profile_model(name: str, epoch: float, data, workdir: Path) -> dict[str, float]:
    import torch
    from torch.func import grad, jvp, vmap
    from torch.profiler import profile as torch_profile

    from lightning_influence.config import LissaConfig
    from lightning_influence.core import InfluenceProblem
    from lightning_influence.core.scoring import PER_EXAMPLE_BUDGET, score_chunk
    from lightning_influence.core.tensors.batching import add_batch_dim
    from lightning_influence.core.tensors.modes import analysis_mode
    from lightning_influence.core.tensors.params import flatten, unflatten

    x, y = data
    n_train = len(x)
    model = build_model(name)
    model.load_state_dict(torch.load(workdir / f"{name}.pt"))
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    s = s_vectors(num_params, NUM_VECTORS)
    problem = InfluenceProblem(model, loss_fn, [], DAMPING, LissaConfig())
    loss, params = problem.loss, problem.params
    tangents = unflatten(s, params)
    rows: list[list[str]] = []
    found: dict[str, float] = {}

    def add(label: str, seconds: float, error: float | None = None) -> None:
        found[label] = seconds
        rows.append([label, f"{1e3 * seconds:.1f}", f"{seconds / epoch:.2f}", "" if error is None else f"{error:.1e}"])

    def over_chunks(fn, chunk: int):
        return lambda: torch.cat([fn((x[i:i + chunk], y[i:i + chunk])) for i in range(0, n_train, chunk)], 1)

    def jvp_loop(batch):
        return -torch.stack([jvp(lambda p: loss(p, batch), (params,), ({k: v[i] for k, v in tangents.items()},))[1]
                             for i in range(NUM_VECTORS)])

    def single(p, example):
        return loss(p, add_batch_dim(example))[0]

    per_example = vmap(grad(single), in_dims=(None, 0))
    cap = min(n_train, PER_EXAMPLE_BUDGET // num_params)
    pe_chunk = min(256, cap)
    pe_batch = (x[:pe_chunk], y[:pe_chunk])
    per_chunk = n_train / pe_chunk
    with analysis_mode(model):
        reference = score_chunk(loss, params, (x, y), s, "jvp")
        with torch.no_grad():
            add(f"forward only, no grad ({n_train} at once)", bench(lambda: loss(params, (x, y))))
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        add(f"forward + backward of sum of losses ({n_train} at once)",
            bench(lambda: torch.autograd.grad(loss(leaves, (x, y)).sum(), list(leaves.values()))))
        for chunk in (64, 256, n_train):
            add(f"jvp (package), k={NUM_VECTORS}, chunk {chunk}",
                bench(over_chunks(lambda b: score_chunk(loss, params, b, s, "jvp"), chunk), reps=3))
        add("jvp (package), k=1, chunk 256",
            bench(over_chunks(lambda b: score_chunk(loss, params, b, s[:1], "jvp"), 256), reps=3))
        add(f"jvp, Python loop over the {NUM_VECTORS} tangents (no vmap), chunk 256", bench(over_chunks(jvp_loop, 256),
                                                                                           reps=3))
        add(f"per_example_grad (package), chunk {pe_chunk}, all {n_train}",
            per_chunk * bench(lambda: score_chunk(loss, params, pe_batch, s, "per_example_grad"), reps=2))
        grads = per_example(params, pe_batch)
        add(f"  of which vmap(grad) to per-tensor grads, x{per_chunk:.1f} chunks",
            per_chunk * bench(lambda: per_example(params, pe_batch), reps=2))
        add(f"  of which flatten (torch.cat) to [chunk, P], x{per_chunk:.1f} chunks",
            per_chunk * bench(lambda: flatten(grads, batch_dims=1), reps=2))
        flat = flatten(grads, batch_dims=1)
        add(f"  of which S @ G^T, x{per_chunk:.1f} chunks", per_chunk * bench(lambda: s @ flat.T, reps=2))
        add(f"  alternative: per-tensor S_l @ G_l^T summed (no cat), x{per_chunk:.1f} chunks",
            per_chunk * bench(lambda: sum(tangents[k].flatten(1) @ g.flatten(1).T for k, g in grads.items()), reps=2))
        for chunk in (256, n_train):
            factored = over_chunks(lambda b: score_chunk(loss, params, b, s, "factored"), chunk)
            add(f"factored (package), k={NUM_VECTORS}, chunk {chunk}", bench(factored, reps=3),
                rel_error(factored(), reference))
        add("factored (package), k=1, chunk 256",
            bench(over_chunks(lambda b: score_chunk(loss, params, b, s[:1], "factored"), 256), reps=3))
        print(f"\n[profile] {name}: {num_params:,} params, {n_train} examples, epoch {1e3 * epoch:.1f} ms; warm "
              "medians; error = max rel. difference to the package's jvp scores")
        print(table(["piece", "ms", "x epoch", "error"], rows))
        for method, chunk in (("jvp", 256), ("per_example_grad", pe_chunk)):
            batch = (x[:chunk], y[:chunk])
            score_chunk(loss, params, batch, s, method)
            with torch_profile() as prof:
                score_chunk(loss, params, batch, s, method)
            print(f"\n  top operators (self CPU time), {name} {method}, one chunk of {chunk}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
    return found


#: glibc serves large allocations with fresh mmap'd pages and unmaps them on free, so every chunk's [chunk, P]
#: per-example gradients are page-faulted in anew. These settings keep freed memory in the heap instead.
NO_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**31 - 1), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def malloc_experiment(workdir: Path, base: dict[str, Any], epochs: dict[str, float], threads: int) -> list[dict]:
    """Scoring at chunk 256 again, in processes whose allocator keeps freed memory (page-fault cost check)."""
    rows, found = [], []
    for name, epoch in epochs.items():
        for method in ("jvp", "per_example_grad"):
            config = {**base, "kind": "score", "model": name, "method": method, "chunk": 256, "k": NUM_VECTORS,
                      "save": f"{name}-{method}-malloc.pt"}
            r = spawn(config, workdir, threads, NO_MMAP_ENV)
            r.update(model=name, method=method, ratio=r["seconds"] / epoch)
            found.append(r)
            rows.append([name, method, f"{r['seconds']:.3f}", f"{r['ratio']:.2f}", f"{r['peak_mib']:.1f}"])
    print(f"\n[profile] scoring at chunk 256 with {' '.join(f'{k}={v}' for k, v in NO_MMAP_ENV.items())} "
          "(compare with table (a), chunk 256; epoch from table (epoch))")
    print(table(["model", "method", "seconds", "x epoch", "peak RSS MiB"], rows))
    return found


# -- the driver -------------------------------------------------------------------------------------------------
def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "python": platform.python_version(), "platform": platform.platform()}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rel_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run: 300 examples, depth 20, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on the 2-vCPU VM this was written on, 2 threads were 1-15x"
                             " slower than 1 for these small models, see docs/benchmarks.md)")
    parser.add_argument("--repeats", type=int, help="timed repeats per scoring run (default 3, quick 1)")
    parser.add_argument("--depth", type=int, help="LiSSA depth (default 1000, quick 20)")
    parser.add_argument("--profile", action="store_true", help="also print operator profiles of one chunk")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)

    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args.workdir)))
        return

    import torch

    n_train = 300 if args.quick else 1500
    repeats = args.repeats or (1 if args.quick else 3)
    depth = args.depth or (20 if args.quick else 1000)
    train_epochs = {"cnn": 3 if args.quick else 15, "mlp": 2 if args.quick else 5}
    info = machine(args.threads)
    started = time.perf_counter()
    print(f"Machine: {info['cpu']} | os.cpu_count()={info['cpu_count']} | torch {info['torch']} | "
          f"threads={info['threads']} (OMP_WAIT_POLICY={info['omp_wait_policy']}) | Python {info['python']} | {info['platform']}")
    print(f"Data: digits, {n_train} training examples (float32), {NUM_VECTORS} test vectors, damping={DAMPING}, "
          f"LiSSA depth={depth}, {repeats} timed repeat(s) per scoring run"
          f"{' [QUICK SMOKE RUN]' if args.quick else ''}")

    results: dict[str, Any] = {"machine": info, "n_train": n_train, "k": NUM_VECTORS, "depth": depth,
                               "repeats": repeats, "quick": args.quick, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (x, y), (x_test, y_test) = digits(n_train)
        for name, epochs in train_epochs.items():
            model = build_model(name)
            optimizer = make_optimizer(model)
            loader = train_loader(x, y, 64, shuffle=True)
            for _ in range(epochs):
                run_epoch(model, optimizer, loader)
            model.eval()
            with torch.no_grad():
                accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
            torch.save(model.state_dict(), workdir / f"{name}.pt")
            num_params = sum(p.numel() for p in model.parameters())
            results["models"][name] = {"num_params": num_params, "train_epochs": epochs, "test_accuracy": accuracy}
            print(f"Trained {name}: {num_params:,} params, {epochs} epochs AdamW(wd=1e-3) batch 64, "
                  f"held-out accuracy {accuracy:.3f}")

        base = {"n_train": n_train, "repeats": repeats}
        for name in train_epochs:
            entry = results["models"][name]
            entry["epoch"] = spawn({**base, "kind": "epoch", "model": name, "repeats": 3}, workdir, args.threads)
            entry["scoring"] = []
            for chunk in CHUNKS:
                for method in METHODS:
                    save = f"{name}-{method}-{chunk}.pt"
                    r = spawn({**base, "kind": "score", "model": name, "method": method, "chunk": chunk,
                               "k": NUM_VECTORS, "save": save}, workdir, args.threads)
                    r.update(method=method, chunk=chunk, ratio=r["seconds"] / entry["epoch"]["seconds"])
                    entry["scoring"].append(r)
                    print(f"  [{time.perf_counter() - started:6.1f}s] {name} score {method:<16s} chunk {chunk:<5d} "
                          f"{r['seconds']:.3f}s", flush=True)
            scores = {(m, c): torch.load(workdir / f"{name}-{m}-{c}.pt") for m in METHODS for c in CHUNKS}
            reference = scores[("per_example_grad", 1500)]
            entry["agreement"] = {f"{m}@{c} vs per_example_grad@1500": rel_error(scores[(m, c)], reference)
                                  for m in METHODS for c in CHUNKS if (m, c) != ("per_example_grad", 1500)}
            entry["stest"] = []
            for batch_size in STEST_BATCHES:
                r = spawn({**base, "kind": "stest", "model": name, "batch_size": batch_size, "depth": depth},
                          workdir, args.threads)
                r.update(ratio=r["seconds"] / entry["epoch"]["seconds"])
                entry["stest"].append(r)
                print(f"  [{time.perf_counter() - started:6.1f}s] {name} s_test batch {r['batch_size']:<4d} "
                      f"{r['seconds']:.2f}s", flush=True)
        if args.profile:
            epochs = {name: m["epoch"]["seconds"] for name, m in results["models"].items()}
            results["profile"] = profile(workdir, n_train, epochs)
            results["malloc"] = malloc_experiment(workdir, base, epochs, args.threads)

    results["wall_seconds"] = time.perf_counter() - started
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nWrote {args.json}")


def print_report(results: dict[str, Any]) -> None:
    k, n = results["k"], results["n_train"]
    runs = [r for m in results["models"].values() for r in [m["epoch"], *m["scoring"], *m["stest"]]]
    shares = [r["cpu_share"] for r in runs]
    print()
    what = ("process CPU time (user + sys; one thread, so equal to wall time on an idle machine)"
            if runs[0]["clock"] == "cpu" else "wall time")
    print(f"Seconds are {what}. CPU share of wall time per measuring process: min {min(shares):.2f}, median "
          f"{statistics.median(shares):.2f} (1.00 = had a CPU to itself throughout).")
    print()
    print(f"(epoch) one plain training epoch: {n} examples, batch 64, AdamW; median of 3 after 1 warm-up")
    print(table(["model", "params", "epoch s", "peak RSS MiB"],
                [[name, f"{m['num_params']:,}", f"{m['epoch']['seconds']:.3f}", f"{m['epoch']['peak_mib']:.1f}"]
                 for name, m in results["models"].items()]))
    print()
    print(f"(a) scoring all {n} training examples against k={k} test vectors; ratio = seconds / epoch "
          f"(target <= {TARGET_RATIO}); peak RSS = peak resident memory above the process after model build")
    rows = []
    for name, m in results["models"].items():
        for r in m["scoring"]:
            method = r["method"] if r["method"] != "auto" else f"auto->{r['resolved']}"
            rows.append([name, method, r["chunk"], r["effective_chunk"], f"{r['seconds']:.3f}", f"{r['ratio']:.2f}",
                         f"{r['ratio'] / k:.3f}", "yes" if r["ratio"] <= TARGET_RATIO else "NO",
                         f"{r['cold_seconds']:.3f}", f"{r['peak_mib']:.1f}"])
    print(table(["model", "method", "chunk", "eff. chunk", "seconds", "x epoch", "x epoch/vector", "<=1.5?", "cold s",
                 "peak RSS MiB"], rows))
    print(f"    seconds: median of {results['repeats']} warm runs; cold s: the first run in the process; eff. chunk:"
          " per_example_grad caps the chunk at PER_EXAMPLE_BUDGET / P examples")
    print()
    print("    agreement: max |scores - reference| / max |reference|, reference = per_example_grad, chunk 1500")
    for name, m in results["models"].items():
        for label, err in m["agreement"].items():
            print(f"    {name:<4s} {label:<45s} {err:.2e}")
    print()
    print(f"(b) one s_test (one test point), LiSSA depth {results['depth']}, damping {DAMPING}, scale='auto'; "
          "seconds include the scale estimate (also timed alone)")
    rows = []
    for name, m in results["models"].items():
        for r in m["stest"]:
            recursion = r["seconds"] - r["scale_seconds"]
            status = "DIVERGED" if r["diverged"] else ("yes" if r["converged"] else "no")
            rows.append([name, r["batch_size"], f"{r['seconds']:.2f}", f"{r['ratio']:.1f}", f"{r['scale_seconds']:.2f}",
                         f"{1e3 * recursion / results['depth']:.2f}", f"{r['scale']:.3g}", status,
                         f"{r['final_update']:.1e}", f"{r['first_call_overhead']:.2f}", f"{r['peak_mib']:.1f}"])
    print(table(["model", "B", "seconds", "x epoch", "scale est. s", "ms/step", "scale", "converged",
                 "last update", "1st-call s", "peak RSS MiB"], rows))
    print("    converged: the package's verdict (last relative update < 0.05); last update = ||h_J - h_J-1|| / "
          "||h_J||; 1st-call s = one-time initialisation paid by the first s_test of a process (not included)")
    for name, m in results["models"].items():
        for r in m["stest"]:
            if r["diverged"]:
                print(f"    {name} B={r['batch_size']}: {r['diverged']}")
    print(f"\nTotal wall time {results['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
