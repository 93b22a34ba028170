#!/usr/bin/env python
"""The LiSSA solve's cost on the 1.0M-parameter CNN of ``benchmarks/scale.py`` (#29): what each lever costs.

The ``cnn`` model of ``benchmarks/scale.py`` is trained one epoch (Adam, lr 1e-3, batch 128) on ``--n`` generated
32x32x3 examples; 8 validation points; Gauss-Newton, ``damping="auto"`` (what the callbacks fall back to at this
size: their self-check is skipped there). Modes:

* ``--probe``: per recursion batch size B, the scale estimate, the predicted series steps
  (``scale / damping * ln(1 / tol)``), the CPU seconds of a recursion step (8 points), of an early-stop check on
  the check subset and of a whole-set residual; with ``--preconditioners`` the K-FAC/EK-FAC build and the
  preconditioned operator's scale.
* ``--variant NAME``: one whole LiSSA solve (``route="recursion"``) under a variant (see ``VARIANTS``), capped at
  ``--max-cpu`` CPU seconds of recursion: steps, CPU seconds per part, each check's residual, the verdict.

* ``--choose``: the step batch rule's choice (``LissaConfig(shrink_batch=True)``) and its probes' CPU seconds.
* ``--merge FILE --code VERSION``: rows of another run (e.g. of the code before a change) join ``--json``;
  ``--summarize``: the derived figures (predicted steps' CPU seconds, a check in steps, the solves' parts).

Rows are appended to (replacing those of the same name in) ``--json`` (``benchmarks/scale-lissa-results.json``);
each names the code it was measured with. Process CPU seconds, one thread. A solve stopped by SIGTERM or its cap
is recorded as ``capped``. The rows in the results file::

    python benchmarks/scale_lissa.py --probe --sizes 128,32,16 --preconditioners kfac   # ~15 min on a free core
    python benchmarks/scale_lissa.py --choose
    python benchmarks/scale_lissa.py --variant shrink --max-cpu 1200    # stopped by hand after step 300
    python benchmarks/scale_lissa.py --variant b128 --max-cpu 270
    python benchmarks/scale_lissa.py --summarize
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from scale import make_data, make_net, per_example_loss  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_influence.config import LissaConfig, ProblemConfig  # noqa: E402
from lightning_influence.core.problem import InfluenceProblem  # noqa: E402
from lightning_influence.core.solvers import neumann  # noqa: E402
from lightning_influence.core.tensors.modes import analysis_mode  # noqa: E402

RESULTS = ROOT / "benchmarks" / "scale-lissa-results.json"
POINTS = 8


def cpu() -> float:
    return time.process_time()


def trained(n: int) -> tuple[torch.nn.Module, DataLoader, Any]:
    torch.manual_seed(0)
    net = make_net("cnn")
    train = make_data("cnn", n, seed=1)
    val = make_data("cnn", 64, seed=2)
    loader = DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for x, y in loader:
        optimizer.zero_grad()
        per_example_loss(net, (x, y)).mean().backward()
        optimizer.step()
    test = (val.tensors[0][:POINTS], val.tensors[1][:POINTS])
    return net, DataLoader(train, batch_size=128), test


def problem_for(net: torch.nn.Module, loader: DataLoader, config: LissaConfig, **kw: Any) -> InfluenceProblem:
    return InfluenceProblem(net, per_example_loss, loader, ProblemConfig(solver=config, damping="auto"), **kw)


def code_version() -> str:
    """The package's commit, with ``+changes`` when its files differ from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "lightning_influence")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


def timed(fn: Any) -> tuple[Any, float]:
    start = cpu()
    out = fn()
    return out, cpu() - start


def probe_one(net: torch.nn.Module, loader: DataLoader, test: Any, size: int, pre: str | None) -> dict[str, Any]:
    """One batch size (and preconditioner): the scale, the predicted steps and the unit costs (CPU seconds)."""
    problem = problem_for(net, loader, LissaConfig(batch_size=size, route="recursion", preconditioner=pre,
                                                   shrink_batch=False))
    solver: Any = problem.solver
    with analysis_mode(net):
        vectors = problem.gradients(test)
        damping, damping_s = timed(lambda: problem.damping)
        _, build_s = timed(solver.prepare)
        scale, scale_s = timed(lambda: solver.scale)
        hvp = solver.operator()[0]
        stream = solver.stream(neumann.repeat_seed(0, 0))
        steps = 3
        with torch.inference_mode(False), torch.enable_grad():
            hvp(next(stream), vectors)  # warm-up
            _, step_s = timed(lambda: [hvp(next(stream), vectors) for _ in range(steps)])
        check_s = None if pre is not None else timed(lambda: problem.check_residual(vectors, vectors))[1]
    row = {"mode": "probe", "batch_size": size, "preconditioner": pre, "code": code_version(), "damping": damping,
           "damping_seconds": round(damping_s, 3), "preconditioner_build_seconds": round(build_s, 3),
           "scale": scale, "scale_seconds": round(scale_s, 3), "step_seconds": round(step_s / steps, 3),
           "check_seconds": None if check_s is None else round(check_s, 3),
           "check_examples": problem.subset_examples, "n_train": len(loader.dataset),
           "stored_jacobian": problem.products.stored() is not None}
    if pre is None:
        row["predicted_steps"] = neumann.series_steps(scale, damping, LissaConfig().residual_tol)
    print(json.dumps(row), flush=True)
    return row


def probe(net: torch.nn.Module, loader: DataLoader, test: Any, sizes: list[int], preconditioners: list[str]
          ) -> list[dict[str, Any]]:
    return [probe_one(net, loader, test, size, pre) for size in sizes for pre in [None, *preconditioners]]


#: Whole solves: the LissaConfig fields and InfluenceProblem keywords of each variant.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "shrink": ({"shrink_batch": True}, {}),  # the step batch rule on, LissaConfig defaults otherwise
    "b128": ({"batch_size": 128, "shrink_batch": False}, {}),
    "b32": ({"batch_size": 32, "shrink_batch": False}, {}),
    "b16": ({"batch_size": 16, "shrink_batch": False}, {}),
    "b128-kfac": ({"batch_size": 128, "preconditioner": "kfac"}, {}),
    "b32-kfac": ({"batch_size": 32, "preconditioner": "kfac", "shrink_batch": False}, {}),
}


class CpuCap(BaseException):
    """Raised by a step once the recursion used its CPU seconds (``--max-cpu``), or on SIGTERM: the solve's row
    is then recorded as ``capped`` with what it measured so far."""


def _terminated(signum: int, frame: Any) -> None:
    raise CpuCap


def whole_solve(net: torch.nn.Module, loader: DataLoader, test: Any, name: str, max_cpu: float,
                config_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One solve under variant ``name``; CPU seconds of each part, each check's residual and the verdict."""
    fields, kw = VARIANTS.get(name, ({}, {}))
    config = LissaConfig(route="recursion", **{**fields, **(config_extra or {})})
    problem = problem_for(net, loader, config, **kw)
    parts = {"check": 0.0, "verdict": 0.0}
    checks: list[dict[str, Any]] = []
    steps = [0]
    original_check, original_sampled = problem.check_residual, problem.sampled_residual

    def check(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows, seconds = timed(lambda: original_check(x, v))
        parts["check"] += seconds
        checks.append({"step": steps[0], "residual": round(float(rows.max()), 5), "seconds": round(seconds, 2)})
        print(json.dumps({"check": checks[-1]}), flush=True)
        return rows

    def sampled(x: torch.Tensor, v: torch.Tensor) -> Any:
        estimate, seconds = timed(lambda: original_sampled(x, v))
        parts["verdict"] += seconds
        checks.append({"step": steps[0], "verdict": round(float(estimate.rows.max()), 5), "seconds": round(seconds, 2),
                       "examples": estimate.examples})
        print(json.dumps({"verdict": checks[-1]}), flush=True)
        return estimate

    problem.check_residual, problem.sampled_residual = check, sampled  # type: ignore[method-assign]
    start = [cpu()]

    def on_step() -> None:  # the cap counts the recursion's steps (from the solve's start), not its checks
        steps[0] += 1
        if cpu() - start[0] - parts["check"] - parts["verdict"] > max_cpu:
            raise CpuCap

    with analysis_mode(net):
        vectors = problem.gradients(test)
        damping, damping_s = timed(lambda: problem.damping)
        (_, scale), setup_s = timed(lambda: (problem.solver.prepare(), problem.solver.scale))  # type: ignore[attr-defined]
        solve_start = start[0] = cpu()
        capped = False
        try:
            result = problem.solve(vectors, on_step)
            info = result.info
        except CpuCap:
            capped, info = True, None
        total = cpu() - solve_start
    row = {"mode": "solve", "variant": name, "code": code_version(), "config": {**fields, **(config_extra or {})}, "problem": kw,
           "n_train": len(loader.dataset), "damping": damping, "damping_seconds": round(damping_s, 2),
           "setup_seconds": round(setup_s, 2), "scale": scale, "steps": steps[0], "capped": capped,
           "solve_seconds": round(total, 2), "check_seconds": round(parts["check"], 2),
           "verdict_seconds": round(parts["verdict"], 2),
           "step_seconds": round(total - parts["check"] - parts["verdict"], 2), "checks": checks}
    if info is not None:
        row.update(residual=info.residual, converged=info.converged, iterations=info.iterations,
                   step_batch_size=info.settings.get("step_batch_size"), batch_scales=info.settings.get("batch_scales"),
                   solved_by=info.settings.get("solved_by", "recursion"),
                   refined_iterations=info.settings.get("refined_iterations"))
    print(json.dumps({k: v for k, v in row.items() if k != "checks"}), flush=True)
    return row


def choose(net: torch.nn.Module, loader: DataLoader, test: Any) -> dict[str, Any]:
    """The step batch rule's choice with ``shrink_batch=True`` (``LissaConfig`` defaults otherwise), and its
    probes' CPU seconds."""
    problem = problem_for(net, loader, LissaConfig(route="recursion", shrink_batch=True))
    solver: Any = problem.solver
    with analysis_mode(net):
        damping = problem.damping
        scale, scale_s = timed(lambda: solver.scale)
        _, choose_s = timed(solver.choose_batch)
    row = {"mode": "choose", "code": code_version(), "n_train": len(loader.dataset), "damping": damping,
           "scale_seconds": round(scale_s, 2), "probe_seconds": round(choose_s, 2),
           "step_batch_size": solver.step_batch_size,
           "batch_scales": {str(b): v for b, v in sorted(solver._chosen[1].items())},
           "predicted_steps": {str(b): neumann.series_steps(v, damping, LissaConfig().residual_tol)
                               for b, v in sorted(solver._chosen[1].items())}}
    print(json.dumps(row), flush=True)
    return row


def save(path: Path, rows: list[dict[str, Any]], n: int) -> None:
    payload: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    payload.setdefault("clock", "process CPU seconds, 1 thread")
    payload["model"] = "cnn of benchmarks/scale.py (1.0M parameters), one epoch Adam"
    payload["torch"] = torch.__version__
    kept = payload.get("rows", [])
    for row in rows:
        key = (row["mode"], row.get("variant"), row.get("batch_size"), row.get("preconditioner"), row["n_train"])
        kept = [r for r in kept if (r["mode"], r.get("variant"), r.get("batch_size"), r.get("preconditioner"),
                                    r["n_train"]) != key]
        kept.append(row)
    payload["rows"] = kept
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def summarize(path: Path) -> None:
    """Derived figures of ``path``'s rows: per probe row the predicted recursion cost (steps x CPU s a step) and a
    check's cost in steps; per solve row its parts' shares."""
    payload = json.loads(path.read_text())
    summary: dict[str, Any] = {}
    for row in payload["rows"]:
        if row["mode"] == "probe" and row.get("predicted_steps"):
            summary[f"probe b{row['batch_size']}"] = {
                "predicted_step_cpu_seconds": round(row["predicted_steps"] * row["step_seconds"], 1),
                "check_in_steps": round(row["check_seconds"] / row["step_seconds"], 1),
                "scale_over_damping": round(row["scale"] / row["damping"], 1)}
        if row["mode"] == "solve":
            summary[f"solve {row['variant']}"] = {
                "checks": sum("residual" in c for c in row["checks"]), "verdicts": sum("verdict" in c for c in row["checks"]),
                "check_cpu_seconds": round(sum(c["seconds"] for c in row["checks"] if "residual" in c), 2),
                "verdict_cpu_seconds": round(sum(c["seconds"] for c in row["checks"] if "verdict" in c), 2)}
    probes = {r["batch_size"]: r for r in payload["rows"] if r["mode"] == "probe" and not r.get("preconditioner")}
    chosen = next((r["step_batch_size"] for r in payload["rows"] if r["mode"] == "choose"), None)
    for row in payload["rows"]:
        size = row.get("step_batch_size") or (chosen if row.get("config", {}).get("shrink_batch") else None)
        if row["mode"] == "solve" and size in probes:  # the steps' CPU seconds by the probe's cost of a step
            summary[f"solve {row['variant']}"]["steps_cpu_seconds_by_probe"] = round(
                row["steps"] * probes[size]["step_seconds"], 1)
    if 128 in probes and 32 in probes:
        summary["step_cost_128_over_32"] = round(probes[128]["step_seconds"] / probes[32]["step_seconds"], 1)
    payload["summary"] = summary
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--choose", action="store_true", help="the step batch rule's choice and its probes")
    parser.add_argument("--sizes", default="128,32,16")
    parser.add_argument("--preconditioners", default="")
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--max-cpu", type=float, default=900.0)
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--merge", help="a results file of another run (e.g. of the code before a change) whose rows"
                        " join --json, each labelled with --code")
    parser.add_argument("--code", help="the code version the --merge rows were measured with")
    parser.add_argument("--summarize", action="store_true", help="add the derived figures to --json")
    args = parser.parse_args()
    if args.summarize:
        summarize(Path(args.json))
        return
    if args.merge:
        merged = json.loads(Path(args.merge).read_text())["rows"]
        for row in merged:
            row.setdefault("code", args.code)
        save(Path(args.json), merged, args.n)
        return
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _terminated)
    net, loader, test = trained(args.n)
    rows = []
    if args.probe:
        rows += probe(net, loader, test, [int(s) for s in args.sizes.split(",")],
                      [p for p in args.preconditioners.split(",") if p])
    if args.choose:
        rows.append(choose(net, loader, test))
    for name in args.variant:
        rows.append(whole_solve(net, loader, test, name, args.max_cpu))
        save(Path(args.json), rows, args.n)
    save(Path(args.json), rows, args.n)


if __name__ == "__main__":
    main()
