#!/usr/bin/env python
"""s_test solvers side by side: our defaults, CG, K-FAC/EK-FAC preconditioned CG, a reference, Kronfluence EK-FAC.

Five seeded tasks on scikit-learn's digits (float32, CPU, one thread): logistic regression (650 parameters), a
small tanh CNN (2,420), an MLP 64-1000-1000-10 (1.08M, 1,200 training examples), the digits example's model
(the layers, data split and optimizer of ``examples/digits.py``, 15 epochs) and the same model on 20,000 jittered
copies of the digits (3 epochs: LiSSA's work does not grow with N, CG's does). ``cg_strict`` is CG at relative
residual 1e-6, the yardstick #25 names; ``seconds_over_cg_strict`` each method's time over it. For 8 test points each method
computes s_test and scores every training example (``I = -s_test . grad L(z)``); every method runs in its own
subprocess so that its peak memory (resident high-water mark above the process's memory after loading the model,
as in ``benchmarks/scoring.py``) and its time (process CPU time: s_test including ``damping="auto"``, plus
scoring) are its own. Quality is the Pearson correlation of each test point's training scores with the
reference's (mean and minimum over the 8 points); the reference is the exact solve where the curvature fits in
memory, else a long CG solve (relative residual 1e-4). Kronfluence (``pip install -c constraints-cpu.txt -e .[bench]``,
then ``pip uninstall -y torchvision``: kronfluence pulls in a torchvision built for another torch, which breaks
``import lightning`` with "operator torchvision::nms does not exist"; kronfluence itself runs without it) fits its EK-FAC
factors (true Fisher, sampled labels) and computes pairwise scores with the same damping as our solve (its
pairwise score correlates positively with our ``I``, so it is compared as it comes).

Each of our rows also records where its s_test time goes (``stage_seconds``: the stored output Jacobian, the
damping estimate, LiSSA's scale estimate, then the solve itself), the whole-set products CG took
(``whole_set_products``: its steps plus the residual verdict), and for the strict CG the steps at which its trace
crossed a few looser tolerances (``steps_to_tol``); ``time_split`` per task puts the default and the strict CG
side by side. With ``--repeats R`` the default, CG and the strict CG run R times each, interleaved, and each
keeps its median run (``s_test_seconds_runs`` lists them all).

Usage::

    python benchmarks/s_test.py            # full run (~400 s measured CPU time; 21 min wall on a busy 2-core VM)
    python benchmarks/s_test.py --quick    # smoke run (fewer examples, no MLP; 6 min wall there)
    python benchmarks/s_test.py --json out.json  # default: benchmarks/s_test-results.json
    python benchmarks/s_test.py --damping 0.01   # every method at damping 0.01 (s_test-damping-0.01-results.json)
    python benchmarks/s_test.py --damping 0.01 --tasks mlp   # one task again, merged into that file
    python benchmarks/s_test.py --damping 0.01 --repeats 3   # default, cg, cg_strict 3 times each: median time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scoring import PeakRSS  # noqa: E402

NUM_POINTS = 8
CG_TOL = 1e-2
#: The tolerance #25 names for its time comparison ("plain Gauss-Newton CG, tolerance 1e-6").
CG_STRICT_TOL = 1e-6
REFERENCE_TOL = 1e-4
METHOD_TIMEOUT_S = 600
#: With ``--repeats R`` these methods run R times, interleaved, and their row is the run with the median s_test time
#: (process CPU time still varies with the load of a shared machine).
REPEATED = ("default", "cg", "cg_strict")


def task_specs(quick: bool) -> dict[str, dict[str, Any]]:
    specs = {
        "logreg": {"model": "logreg", "n_train": 300 if quick else 1200, "epochs": 30, "lr": 0.05},
        "cnn": {"model": "cnn", "n_train": 300 if quick else 1200, "epochs": 10, "lr": 0.01},
        "mlp": {"model": "mlp", "n_train": 1200, "epochs": 3, "lr": 1e-3},
        "digits_example": {"model": "digits_example", "n_train": 1400, "epochs": 15, "lr": 0.01},
        # the same model on 20,000 jittered digits (3 epochs): LiSSA's work is J x B examples whatever N,
        # CG's about 40 passes over N: where the two cross
        "digits_example_20k": {"model": "digits_example", "n_train": 20_000, "epochs": 3, "lr": 0.01, "jitter": True},
    }
    if quick:
        del specs["mlp"], specs["digits_example_20k"]
        specs["digits_example"]["epochs"] = 3
    return specs


def methods_for(task: str) -> list[str]:
    reference = "long_cg" if task in ("mlp", "digits_example_20k") else "exact"
    ours = ["default", "cg", "cg_strict", "cg_ekfac"] + ([] if task in ("mlp", "digits_example_20k") else ["cg_kfac"])
    return [reference, *ours, "kronfluence_ekfac"]


# -- data and models ------------------------------------------------------------------------------------------
def data(spec: dict[str, Any]):
    import torch
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    if spec.get("jitter"):  # n_train copies of the first 1,400 digits, each shifted by up to a pixel, plus noise
        generator = torch.Generator().manual_seed(1)
        source, test = order[:1400], order[1400:][: spec.get("points", NUM_POINTS)]
        picks = source[torch.randint(0, len(source), (spec["n_train"],), generator=generator)]
        shifts = torch.randint(-1, 2, (spec["n_train"], 2), generator=generator)
        images = torch.stack([torch.roll(x[i], (int(a), int(b)), dims=(1, 2)) for i, (a, b) in zip(picks, shifts)])
        images = images + 0.05 * torch.randn(images.shape, generator=generator)
        return (images, y[picks]), (x[test], y[test])
    train, test = order[: spec["n_train"]], order[spec["n_train"] :][: spec.get("points", NUM_POINTS)]
    return (x[train], y[train]), (x[test], y[test])


def build_model(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 10, 3, padding=1, stride=2),
                             nn.Tanh(), nn.Flatten(), nn.Linear(160, 10))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 1000), nn.Tanh(), nn.Linear(1000, 1000), nn.Tanh(),
                             nn.Linear(1000, 10))
    if name == "digits_example":  # examples/digits.py's DigitsCNN.net
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                             nn.Tanh(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    raise ValueError(name)


def loss_fn(model, batch):
    import torch.nn.functional as F

    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def train(spec: dict[str, Any], path: Path) -> None:
    import torch
    import torch.nn.functional as F

    (x, y), _ = data(spec)
    model = build_model(spec["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"], weight_decay=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(spec["epochs"]):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            chosen = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[chosen]), y[chosen]).backward()
            optimizer.step()
    torch.save(model.state_dict(), path)


# -- one method (run in its own process) ----------------------------------------------------------------------
def run_method(task: str, method: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    (x, y), test = data(spec)
    model = build_model(spec["model"])
    model.load_state_dict(torch.load(workdir / f"{task}.pt"))
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    # what a user runs: damping="auto" (or --damping), timed
    ours = method in ("default", "cg", "cg_strict", "cg_ekfac", "cg_kfac")
    damping = spec.get("damping") if ours else json.loads((workdir / f"{task}-damping.json").read_text())["damping"]
    # torch.autograd.grad imports torch.fx's symbolic shapes on its first call with grad_outputs (about 0.9 s of CPU
    # here): once per process whatever the method, so it is imported before the clock starts
    import torch.fx.experimental.symbolic_shapes  # noqa: F401
    memory = PeakRSS()
    start = time.process_time()
    if method == "kronfluence_ekfac":
        scores, info = _kronfluence(model, TensorDataset(x, y), TensorDataset(*test), damping, workdir / task)
    else:
        scores, info = _ours(model, loader, test, method, damping)
    seconds = time.process_time() - start
    torch.save(scores, workdir / f"{task}-{method}.pt")
    return {"seconds": seconds, "peak_mib": memory.peak_mib(), **info}


def _ours(model, loader, test, method: str, damping: float | None) -> tuple[Any, dict[str, Any]]:
    from lightning_influence.config import CGConfig, ExactConfig, LissaConfig
    from lightning_influence.core import InfluenceProblem
    from lightning_influence.core.tensors.modes import analysis_mode

    configs = {
        "default": LissaConfig(), "exact": ExactConfig(), "long_cg": CGConfig(tol=REFERENCE_TOL, max_iter=300),
        "cg": CGConfig(tol=CG_TOL), "cg_strict": CGConfig(tol=CG_STRICT_TOL, max_iter=1000),
        "cg_ekfac": CGConfig(tol=CG_TOL, preconditioner="ekfac"),
        "cg_kfac": CGConfig(tol=CG_TOL, preconditioner="kfac"),
    }
    with analysis_mode(model):
        problem = InfluenceProblem(model, loss_fn, loader, "auto" if damping is None else damping, configs[method])
        vectors = problem.gradients(test)
        start = time.process_time()
        stages = _stages(problem)  # the solve's fixed costs, each computed once and cached for the solve below
        clock = time.process_time()
        result = problem.solve(vectors)  # s_test alone (the damping estimate included), timed apart from scoring
        stages["solve"] = time.process_time() - clock
        s_test_seconds = time.process_time() - start
        scores = -__import__("torch").cat(list(problem.scores(result.vectors)), dim=1)
    info = result.info
    settings = info.settings or {}
    iterations = info.iterations if settings.get("solved_by") is None else settings.get("refined_iterations")
    return scores, {"damping": info.damping, "residual": info.residual, "converged": info.converged,
                    "steps": info.iterations, "solver": info.solver, "s_test_seconds": s_test_seconds,
                    "stage_seconds": {k: round(v, 4) for k, v in stages.items()},
                    # CG's products over the whole training set: one per step, one more for the residual verdict
                    "whole_set_products": None if iterations is None or info.solver not in ("cg", "lissa")
                    or (info.solver == "lissa" and settings.get("solved_by") is None) else iterations + 1,
                    "solved_by": settings.get("solved_by"), "refined_iterations": settings.get("refined_iterations"),
                    "steps_to_tol": _steps_to_tol(info) if method == "cg_strict" else None}


#: Relative residuals at which ``steps_to_tol`` reads the strict CG's trace: the steps a CG stopping there would take.
TRACE_TOLS = (0.05, 0.03, 0.02, 0.01, 1e-3)


def _steps_to_tol(info) -> dict[str, int]:
    """The first step at which the strict CG's worst relative residual (its recurrence's) is below each of
    ``TRACE_TOLS``: the steps a CG stopping at that tolerance takes on the same system (CG's iterates do not depend
    on where it stops)."""
    trace = info.trace.reshape(-1)
    below = {tol: (trace < tol).nonzero() for tol in TRACE_TOLS}
    return {f"{tol:g}": int(found[0, 0]) + 1 for tol, found in below.items() if len(found)}


def _stages(problem) -> dict[str, float]:
    """Process CPU seconds of the solve's fixed costs, in the order the solve needs them: the stored output
    Jacobian (``jacobian_store``: Hessians, speed probe, factors, agreement check; 0 where it is not stored),
    the damping (``damping``: the spectrum estimate under ``damping="auto"``), LiSSA's scale estimate (``scale``,
    which its route to CG reads). Each is cached, so ``problem.solve`` afterwards (``solve``: the CG steps, or
    the series, and the residual verdict) does not redo it and the stages add up to the solve's time."""
    from lightning_influence.core.solvers.lissa import LissaSolver

    stages = {}
    for name, compute in (("jacobian_store", lambda: problem.products.stored()),
                          ("damping", lambda: problem.damping),
                          ("scale", lambda: problem.solver.scale if isinstance(problem.solver, LissaSolver) else None)):
        clock = time.process_time()
        compute()
        stages[name] = time.process_time() - clock
    return stages


def _kronfluence(model, train_set, test_set, damping: float, output: Path) -> tuple[Any, dict[str, Any]]:
    import logging

    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            if not sample:
                return F.cross_entropy(logits, batch[1], reduction="sum")
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    torch.manual_seed(0)
    model = prepare_model(model, Classification())
    analyzer = Analyzer("s_test_bench", model, Classification(), cpu=True, disable_tqdm=True, output_dir=str(output),
                        log_level=logging.WARNING)
    analyzer.fit_all_factors("ekfac", train_set, per_device_batch_size=256,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("scores", "ekfac", test_set, train_set, per_device_query_batch_size=len(test_set),
                                     per_device_train_batch_size=256, score_args=ScoreArguments(damping_factor=damping),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return scores.float(), {"damping": damping, "residual": None, "converged": None, "steps": None,
                             "solver": "kronfluence ekfac"}


# -- driver ---------------------------------------------------------------------------------------------------
def pearson(a, b) -> tuple[float, float]:
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    r = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    return float(r.mean()), float(r.min())


def subprocess_run(task: str, method: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", json.dumps([task, method, spec]), "--workdir", str(workdir)]
    limit = spec.get("method_timeout", METHOD_TIMEOUT_S)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_task(task: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import torch

    train(spec, workdir / f"{task}.pt")
    rows: dict[str, Any] = {}
    for method in ["default", *[m for m in methods_for(task) if m != "default"]]:  # default resolves the damping
        row = subprocess_run(task, method, spec, workdir)
        if spec.get("damping") is not None:  # --damping: every method's damping is known before any runs
            (workdir / f"{task}-damping.json").write_text(json.dumps({"damping": spec["damping"]}))
        elif method == "default" and "damping" in row:
            (workdir / f"{task}-damping.json").write_text(json.dumps({"damping": row["damping"]}))
        rows[method] = row
        print(f"  {task:15s} {method:18s} {_line(row)}", flush=True)
    runs = {method: [rows[method]] for method in REPEATED if "error" not in rows.get(method, {"error": None})}
    for _ in range(spec.get("repeats", 1) - 1):  # interleaved: a change in the machine's load hits every method alike
        for method in runs:
            row = subprocess_run(task, method, spec, workdir)
            if "error" not in row:
                runs[method].append(row)
    for method, found in runs.items():  # the run with the median s_test time, and every run's time
        if len(found) > 1:
            ordered = sorted(found, key=lambda row: row["s_test_seconds"])
            rows[method] = {**ordered[(len(ordered) - 1) // 2],
                            "s_test_seconds_runs": [round(row["s_test_seconds"], 4) for row in found]}
    reference = methods_for(task)[0]
    if "error" not in rows[reference]:
        expected = torch.load(workdir / f"{task}-{reference}.pt")
        for method, row in rows.items():
            if "error" not in row:
                row["pearson_mean"], row["pearson_min"] = pearson(torch.load(workdir / f"{task}-{method}.pt"), expected)
    add_ratios(rows)
    params = sum(p.numel() for p in build_model(spec["model"]).parameters())
    found = {"parameters": params, "n_train": spec["n_train"], "reference": reference, "methods": rows,
             "repeats": spec.get("repeats", 1)}
    split = time_split(rows)
    return {**found, "time_split": split} if split else found


def time_split(rows: dict[str, Any]) -> dict[str, Any] | None:
    """Where the default's and the strict CG's s_test time goes, when both solved by CG over the stored rows:
    fixed costs (``stage_seconds`` other than ``solve``), whole-set products (CG steps plus the residual verdict)
    and the seconds per product (``solve`` over the products). ``products_ratio`` is the ratio the default would
    reach with no fixed costs; ``predicted_over_cg_strict[tol]`` the default's predicted time over the strict
    CG's if its CG stopped at ``tol`` (the strict CG's ``steps_to_tol``, plus the verdict, at the default's
    measured seconds per product, plus its fixed costs): a prediction from this run's measurements, not a run."""
    default, strict = rows.get("default", {}), rows.get("cg_strict", {})
    if not (default.get("whole_set_products") and strict.get("whole_set_products") and "stage_seconds" in default):
        return None
    out: dict[str, Any] = {}
    for name, row in (("default", default), ("cg_strict", strict)):
        stages = row["stage_seconds"]
        out[name] = {"fixed_seconds": round(sum(v for k, v in stages.items() if k != "solve"), 3),
                     "products": row["whole_set_products"],
                     "seconds_per_product": round(stages["solve"] / row["whole_set_products"], 4)}
    out["products_ratio"] = round(default["whole_set_products"] / strict["whole_set_products"], 2)
    per_product, fixed = out["default"]["seconds_per_product"], out["default"]["fixed_seconds"]
    out["predicted_over_cg_strict"] = {tol: round((fixed + (steps + 1) * per_product) / strict["s_test_seconds"], 2)
                                       for tol, steps in (strict.get("steps_to_tol") or {}).items()}
    return out


def add_ratios(rows: dict[str, Any]) -> None:
    """Each row's time over the strict CG's: s_test with scoring (``seconds_over_cg_strict``) and s_test alone
    (``s_test_over_cg_strict``, the comparison #25 asks for)."""
    for key, ratio in (("seconds", "seconds_over_cg_strict"), ("s_test_seconds", "s_test_over_cg_strict")):
        strict = rows.get("cg_strict", {}).get(key)
        for row in rows.values():
            if strict and key in row:
                row[ratio] = round(row[key] / strict, 2)


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"ERROR {row['error']}"
    residual = "-" if row.get("residual") is None else f"{row['residual']:.3g}"
    return (f"{row['seconds']:7.1f} s  {row['peak_mib']:7.0f} MiB  residual {residual:>8s}  steps {row.get('steps')}"
            f"  damping {row['damping']:.3g}")


def table(results: dict[str, Any]) -> str:
    """The results as one markdown table (what docs/solvers.md quotes)."""
    lines = ["| task (parameters, train) | method | seconds | / strict CG | s_test seconds | / strict CG | peak MiB |"
             " residual | steps | Pearson mean (min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, found in results["tasks"].items():
        for method, row in found["methods"].items():
            name = f"{task} ({found['parameters']:,}, {found['n_train']:,})"
            if "error" in row:
                lines.append(f"| {name} | {method} | {row['error']} | | | | | | | |")
                continue
            residual = "-" if row.get("residual") is None else f"{row['residual']:.3g}"
            quality = f"{row['pearson_mean']:.4f} ({row['pearson_min']:.4f})" if "pearson_mean" in row else "-"
            ratio = f"{row['seconds_over_cg_strict']:.2f}x" if "seconds_over_cg_strict" in row else "-"
            alone = f"{row['s_test_seconds']:.2f}" if "s_test_seconds" in row else "-"
            alone_ratio = f"{row['s_test_over_cg_strict']:.2f}x" if "s_test_over_cg_strict" in row else "-"
            lines.append(f"| {name} | {method} | {row['seconds']:.1f} | {ratio} | {alone} | {alone_ratio} |"
                         f" {row['peak_mib']:.0f} | {residual} |"
                         f" {row.get('steps') if row.get('steps') is not None else '-'} | {quality} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="default: benchmarks/s_test-results.json (with --damping D:"
                        " benchmarks/s_test-damping-D-results.json)")
    parser.add_argument("--damping", type=float, help="every method at this fixed damping instead of 'auto'")
    parser.add_argument("--points", type=int, default=NUM_POINTS, help="test points solved at once (default: 8;"
                        " another number writes ...-points-N-results.json)")
    parser.add_argument("--tasks", nargs="+", help="only these tasks, merged into the results file's others")
    parser.add_argument("--table", metavar="RESULTS", help="print the markdown table of a results file and exit")
    parser.add_argument("--add-ratios", metavar="RESULTS", help="add seconds_over_cg_strict (and time_split) to a"
                        " results file")
    parser.add_argument("--method-timeout", type=float, default=METHOD_TIMEOUT_S,
                        help="wall seconds one method may take (default: %(default)s; more on a busy machine: the"
                        " figures are process CPU time)")
    parser.add_argument("--repeats", type=int, default=1, help="run default, cg and cg_strict this many times each"
                        " (interleaved) and keep the median s_test time (default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.add_ratios:  # results written before the ratios were: add them in place
        found = json.loads(Path(args.add_ratios).read_text())
        for task in found["tasks"].values():
            add_ratios(task["methods"])
            split = time_split(task["methods"])
            if split:
                task["time_split"] = split
        Path(args.add_ratios).write_text(json.dumps(found, indent=2) + "\n")
        return
    import torch

    torch.set_num_threads(1)
    if args.one:
        task, method, spec = json.loads(args.one)
        print(json.dumps(run_method(task, method, spec, Path(args.workdir))))
        return
    if args.json is None:
        suffix = "" if args.damping is None else f"-damping-{args.damping:g}"
        suffix += "" if args.points == NUM_POINTS else f"-points-{args.points}"
        args.json = str(Path(__file__).with_name(f"s_test{suffix}-results.json"))
    started = time.perf_counter()
    results: dict[str, Any] = {"quick": args.quick, "damping": args.damping or "auto", "points": args.points,
                               "cg_tol": CG_TOL, "cg_strict_tol": CG_STRICT_TOL, "reference_tol": REFERENCE_TOL,
                               "torch": torch.__version__,
                               "machine": platform.machine(), "clock": "process CPU time, one thread", "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for task, spec in task_specs(args.quick).items():
            if args.tasks and task not in args.tasks:
                continue
            if args.damping is not None:
                spec = {**spec, "damping": args.damping}
            if args.points != NUM_POINTS:
                spec = {**spec, "points": args.points}
            if args.method_timeout != METHOD_TIMEOUT_S:
                spec = {**spec, "method_timeout": args.method_timeout}
            if args.repeats > 1:
                spec = {**spec, "repeats": args.repeats}
            results["tasks"][task] = run_task(task, spec, Path(tmp))
            for method, row in results["tasks"][task]["methods"].items():
                if "pearson_mean" in row:
                    print(f"  {task:15s} {method:18s} pearson mean {row['pearson_mean']:.4f} min {row['pearson_min']:.4f}")
    results["wall_seconds"] = time.perf_counter() - started
    if args.tasks and Path(args.json).exists():  # a partial run: keep the other tasks of the file
        earlier = json.loads(Path(args.json).read_text())
        results["tasks"] = {**earlier["tasks"], **results["tasks"]}
        results["wall_seconds_partial_runs"] = {**earlier.get("wall_seconds_partial_runs", {}),
                                                " ".join(args.tasks): results["wall_seconds"]}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
