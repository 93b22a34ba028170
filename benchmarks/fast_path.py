#!/usr/bin/env python
"""The fast path on scikit-learn digits: kNN candidate recall, ``scale="auto"`` against fixed scales, and a
side-by-side with the ``pytorch-influence-functions`` package (PyPI 0.1.1).

Data and models are those of ``benchmarks/scoring.py`` (first 1,500 digits for training, float32, AdamW with
weight decay 1e-3): the tanh CNN (1,954 parameters) and the 1.1M-parameter MLP, plus a logistic regression
(650 parameters) for the scale study. The 8 test points of a model are its 8 highest-loss held-out digits.

1. **Recall of kNN candidates**: for k = 1, 5, 10, 25 % of the training set, the fraction of the top-10
   harmful and top-10 helpful training points of full scoring that lie inside each test point's k candidates
   with the same s_test vectors, and the time of full scoring against features + kNN + candidate scoring.
   Candidate rankings: ``activations`` (Euclidean kNN on the input of the last ``nn.Linear``, the former
   default), ``last_layer_grad`` (largest ``|<G_test, G_i>|`` of last-layer loss gradients, factored; the
   default since this measurement) and,
   for comparison only, ``last_layer_grad_cosine`` (the same gradients, largest ``|cosine|``) and
   ``last_layer_grad_signed`` (k/2 largest and k/2 most negative inner products).
2. **scale**: LiSSA with ``scale="auto"`` against fixed scales: Pearson with the exact solver over all
   training points (LR and CNN).
3. **Side by side** with ``pytorch_influence_functions`` on the CNN: same model, data, 8 test points,
   damping, depth, minibatch size and scale (the value our ``scale="auto"`` chose). Time to top-10 for the 8
   points and Pearson of each with the exact solver.

Usage::

    python benchmarks/fast_path.py            # full run (about 10 CPU minutes here)
    python benchmarks/fast_path.py --quick    # smoke run (300 training examples, short recursions)
    python benchmarks/fast_path.py --json out.json
    python benchmarks/fast_path.py --recall-only   # section 1 only (no exact solver, no side by side)

Every time is process CPU time (``time.process_time``, one torch thread) and wall time, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scoring as shared  # data, models, training loop of the scoring benchmark
import torch
from torch import nn
from torchmetrics.functional import pearson_corrcoef

from lightning_influence import top_influences
from lightning_influence.config import LAST_LAYER_GRAD, ExactConfig, LissaConfig
from lightning_influence.core import InfluenceProblem, LissaDivergenceError
from lightning_influence.core.candidates import Neighbours, knn_torch, select_candidates
from lightning_influence.core.per_example.features import GradientFactors, batch_features, factored_similarity
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode

NUM_POINTS = 8
TOP = 10
FRACTIONS = (0.01, 0.05, 0.10, 0.25)
FEATURES = ("activations", "last_layer_grad", "last_layer_grad_cosine", "last_layer_grad_signed")
FIXED_SCALES = (10.0, 25.0, 100.0)
CHEAP_DEPTHS = (100, 300)


class Timer:
    """CPU and wall seconds of a block."""

    def __enter__(self) -> Timer:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def build(name: str) -> nn.Module:
    if name == "lr":
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return shared.build_model(name)


def train(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    model = build(name)
    optimizer = shared.make_optimizer(model)
    loader = shared.train_loader(x, y, 64, shuffle=True)
    for _ in range(epochs):
        shared.run_epoch(model, optimizer, loader)
    return model.eval()


def worst_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        losses = shared.loss_fn(model, (x, y))
    chosen = losses.argsort(descending=True)[:NUM_POINTS]
    return x[chosen], y[chosen]


def problem_for(model, x, y, damping: float, config) -> InfluenceProblem:
    return InfluenceProblem(model, shared.loss_fn, shared.train_loader(x, y, 256, shuffle=False), damping, config)


def solve(problem: InfluenceProblem, test: tuple) -> tuple[torch.Tensor, Any]:
    with analysis_mode(problem.model):
        result = problem.solve(problem.gradients(test))
    return result.vectors, result.info


def full_scores(problem: InfluenceProblem, s: torch.Tensor) -> torch.Tensor:
    with analysis_mode(problem.model):
        return torch.cat(list(problem.scores(s)), dim=1)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Pearson per test point (rows), by torchmetrics, in float64."""
    return [float(pearson_corrcoef(a[i].double(), b[i].double())) for i in range(a.shape[0])]


def summary(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} (min {min(values):.3f})"


# -- 1. recall of kNN candidates ------------------------------------------------------------------------------
def recall_study(name: str, model, data, test, damping: float, lissa: dict[str, Any]) -> dict[str, Any]:
    (x, y) = data
    problem = problem_for(model, x, y, damping, LissaConfig(**lissa))
    with Timer() as t_solve:
        s, info = solve(problem, test)
    with Timer() as t_full:
        scores = full_scores(problem, s)
    harmful = scores.topk(TOP, dim=1).indices
    helpful = scores.topk(TOP, dim=1, largest=False).indices
    indexed = IndexedData(torch.utils.data.TensorDataset(x, y), batch_size=256)
    rows = []
    for features, fraction in ((f, r) for f in FEATURES for r in FRACTIONS):
        k = max(1, round(fraction * len(x)))
        with Timer() as t_knn, analysis_mode(model):
            found = candidates_by(features, model, test, indexed, k)
        union = torch.unique(found.indices)
        with Timer() as t_scored:
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(indexed.dataset, union.tolist()), batch_size=256)
            with analysis_mode(model):
                for _ in problem.scores(s, loader):
                    pass
        own = [set(row.tolist()) for row in found.indices]
        recall_harmful = sum(len(own[i] & set(harmful[i].tolist())) for i in range(NUM_POINTS)) / (TOP * NUM_POINTS)
        recall_helpful = sum(len(own[i] & set(helpful[i].tolist())) for i in range(NUM_POINTS)) / (TOP * NUM_POINTS)
        rows.append({
            "features": features, "fraction": fraction, "k": k, "union": int(len(union)), "recall_harmful": recall_harmful,
            "recall_helpful": recall_helpful, "knn_cpu": t_knn.cpu, "candidate_scoring_cpu": t_scored.cpu,
            "fast_cpu": t_knn.cpu + t_scored.cpu,
        })
    return {"model": name, "lissa": lissa, "damping": damping, "s_test_cpu": t_solve.cpu, "scale": info.scale,
            "full_scoring_cpu": t_full.cpu, "rows": rows}


def candidates_by(features: str, model, test, indexed: IndexedData, k: int):
    """Each test point's k candidates under one of :data:`FEATURES`."""
    if features == "activations":
        return select_candidates(model, test, indexed.batches_with_indices(), k, "activations")
    if features == LAST_LAYER_GRAD:
        return select_candidates(model, test, indexed.batches_with_indices(), k, LAST_LAYER_GRAD,
                                 loss_fn=shared.loss_fn)
    # cosine: the same factored gradients with g and a scaled to unit length (|G| = |g| |a|)
    def unit(f: GradientFactors) -> GradientFactors:
        return GradientFactors(torch.nn.functional.normalize(f.out_grads.double(), dim=1),
                               torch.nn.functional.normalize(f.inputs.double(), dim=1))

    device = torch.device("cpu")
    scale = unit if features == "last_layer_grad_cosine" else (lambda f: f)
    queries = scale(batch_features(model, test, LAST_LAYER_GRAD, device, shared.loss_fn))
    parts = [scale(batch_features(model, b, LAST_LAYER_GRAD, device, shared.loss_fn))
             for _, b in indexed.batches_with_indices()]
    keys = GradientFactors(torch.cat([p.out_grads for p in parts]), torch.cat([p.inputs for p in parts]))
    if features == "last_layer_grad_cosine":
        return knn_torch(queries, keys, k, chunk_size=256)
    similarity = factored_similarity(queries, keys)  # signed: k - k // 2 most negative, k // 2 most positive
    chosen = torch.cat([similarity.topk(k - k // 2, dim=1, largest=False).indices,
                        similarity.topk(k // 2, dim=1).indices], dim=1)
    return Neighbours(chosen, similarity.gather(1, chosen))


# -- 2. scale="auto" against fixed scales ---------------------------------------------------------------------
def scale_study(name, model, data, test, damping, exact, lissa: dict[str, Any]) -> list[dict[str, Any]]:
    x, y = data
    rows = []
    for scale in ("auto", *FIXED_SCALES):
        problem = problem_for(model, x, y, damping, LissaConfig(**{**lissa, "scale": scale}))
        row: dict[str, Any] = {"model": name, "scale": scale}
        try:
            with Timer() as t:
                s, info = solve(problem, test)
            pearson = pearson_rows(full_scores(problem, s), exact)
            row.update(value=info.scale, pearson=pearson, cpu=t.cpu, converged=info.converged,
                       last_update=float(info.trace[0, -1]))
        except LissaDivergenceError as err:
            row.update(value=problem.solver.scale, diverged=str(err).split(" (")[0])
        rows.append(row)
    return rows


# -- 3. pytorch-influence-functions ---------------------------------------------------------------------------
def theirs(model, data, test, damping: float, scale: float, depth: int, batch_size: int) -> dict[str, Any]:
    """Their public functions with ``gpu=-1`` (CPU): ``calc_s_test_single`` then ``calc_influence_single``.

    Their top-level ``calc_img_wise`` hard-codes ``gpu=0`` (``.cuda()``), so it cannot run on a CPU-only torch;
    the lower-level functions take ``gpu=-1``. That is the only change: no patching of their code.
    """
    import pytorch_influence_functions as pif
    from pytorch_influence_functions.calc_influence_function import calc_influence_single, calc_s_test_single

    x, y = data
    tx, ty = test
    record: dict[str, Any] = {"version": getattr(pif, "__version__", "0.1.1")}
    try:  # what a user of the documented entry point gets on a CPU build of torch
        config = pif.get_default_config()
        config.update(outdir=tempfile.mkdtemp(), test_sample_num=1, test_start_index=0, num_classes=10, recursion_depth=1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=1)
        pif.calc_img_wise(config, model, loader, loader)
        record["calc_img_wise"] = "ran"
    except Exception as err:  # noqa: BLE001 - recorded for the report
        record["calc_img_wise"] = f"{type(err).__name__}: {err}"
    sampler = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                          generator=torch.Generator().manual_seed(0))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=1)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tx, ty), batch_size=1)
    rows, s_cpu, score_cpu = [], 0.0, 0.0
    with Timer() as total:
        for i in range(len(tx)):
            with Timer() as t_s:
                s_vec = calc_s_test_single(model, tx[i : i + 1], ty[i : i + 1], sampler, gpu=-1, damp=damping,
                                           scale=scale, recursion_depth=depth, r=1)
            with Timer() as t_score:
                influences, *_ = calc_influence_single(model, train, test_loader, i, gpu=-1,
                                                                        recursion_depth=depth, r=1, s_test_vec=s_vec)
            s_cpu, score_cpu = s_cpu + t_s.cpu, score_cpu + t_score.cpu
            rows.append(torch.tensor([float(v) for v in influences]))
    record.update(scores=torch.stack(rows), cpu=total.cpu, wall=total.wall, s_test_cpu=s_cpu, scoring_cpu=score_cpu)
    return record


def ours(model, data, test, damping: float, lissa: dict[str, Any], candidates: int | None) -> dict[str, Any]:
    x, y = data
    loader = shared.train_loader(x, y, 256, shuffle=False)
    with Timer() as t:
        top = top_influences(model, shared.loss_fn, loader, test, top_k=TOP, damping=damping, num_candidates=candidates,
                             **lissa)
    return {"cpu": t.cpu, "wall": t.wall, "top": top}


def side_by_side(model, data, test, damping, exact, lissa, quick: bool) -> dict[str, Any]:
    x, y = data
    # our scale="auto" value, handed to theirs as a number so both recursions use the same scale
    probe = problem_for(model, x, y, damping, LissaConfig(**lissa))
    with analysis_mode(model):
        scale = probe.lissa_scale()
    settings = {**lissa, "scale": scale}
    results: dict[str, Any] = {"settings": {**settings, "damping": damping}}
    # ours, same settings, all training points scored (for Pearson over everything), then with candidates
    problem = problem_for(model, x, y, damping, LissaConfig(**settings))
    with Timer() as t_all:
        s, _ = solve(problem, test)
        scores = full_scores(problem, s)
    results["ours_full"] = {"cpu": t_all.cpu, "wall": t_all.wall, "pearson": pearson_rows(scores, exact)}
    for fraction in (0.10,):
        k = round(fraction * len(x))
        run = ours(model, data, test, damping, settings, k)
        results[f"ours_candidates_{k}"] = {"cpu": run["cpu"], "wall": run["wall"], "k": k}
    fast = {**settings, "batch_size": 1, "scale": "auto"}  # FastIF's B = 1 (scale re-estimated for B = 1)
    problem = problem_for(model, x, y, damping, LissaConfig(**fast))
    with Timer() as t_fast:
        s_fast, info = solve(problem, test)
    results["ours_b1"] = {"cpu_s_test": t_fast.cpu, "pearson": pearson_rows(full_scores(problem, s_fast), exact),
                          "scale": info.scale}
    run = ours(model, data, test, damping, fast, round(0.10 * len(x)))
    results["ours_b1_candidates"] = {"cpu": run["cpu"], "wall": run["wall"]}
    for depth in CHEAP_DEPTHS:  # cheaper still: where does our correlation fall to theirs?
        cheap = {**fast, "depth": depth}
        problem = problem_for(model, x, y, damping, LissaConfig(**cheap))
        s_cheap, _ = solve(problem, test)
        run = ours(model, data, test, damping, cheap, round(0.10 * len(x)))
        results[f"ours_b1_depth{depth}"] = {"cpu": run["cpu"], "wall": run["wall"], "depth": depth,
                                            "pearson": pearson_rows(full_scores(problem, s_cheap), exact)}
    results["theirs"] = theirs(model, data, test, damping, scale, settings["depth"], settings["batch_size"])
    results["theirs"]["pearson"] = pearson_rows(results["theirs"]["scores"], exact)
    del results["theirs"]["scores"]
    return results


# -- 4. preselect="auto": does the automatic choice pick the cheaper path? ----------------------------------------
PRESELECT_FRACTIONS = (0.01, 0.10, 0.25)
PRESELECT_POINTS = (1, 8)


def _median(step, runs: int) -> tuple[dict[str, float], Any]:
    """Median process CPU and wall seconds of ``runs`` calls of ``step`` (and its last result)."""
    cpu, wall, result = [], [], None
    for _ in range(runs):
        with Timer() as t:
            result = step()
        cpu.append(t.cpu)
        wall.append(t.wall)
    return {"cpu": sorted(cpu)[len(cpu) // 2], "wall": sorted(wall)[len(wall) // 2]}, result


def preselect_study(name: str, model, data, test, runs: int) -> dict[str, Any]:
    """For k = 1, 10, 25 % and 1 or 8 test points: CPU seconds of full scoring, of candidates with
    ``preselect="always"`` (features + kNN + scoring the union) and of ``preselect="auto"`` (probe, then the
    path it chose), with the probe's estimate. s_test is not part of it (the same for every path): its
    vectors come from a short LiSSA solve, since scoring costs do not depend on their values."""
    from lightning_influence.config import ExplainConfig
    from lightning_influence.core.candidates import CandidateScoreCollector
    from lightning_influence.distributed.collectives import SingleProcess
    from lightning_influence.distributed.scoring import (
        choose_candidates,
        estimate_preselection,
        find_candidates,
        score_candidates,
        score_training_set,
    )

    x, y = data
    train = IndexedData(torch.utils.data.TensorDataset(x, y), batch_size=256)
    problem = problem_for(model, x, y, 0.01, LissaConfig(depth=20, batch_size=32))
    one = SingleProcess()
    rows = []
    for points, fraction in ((p, f) for p in PRESELECT_POINTS for f in PRESELECT_FRACTIONS):
        k = max(1, round(fraction * len(x)))
        tx, ty = test[0][:points], test[1][:points]
        s, _ = solve(problem, (tx, ty))
        settings = ExplainConfig(num_candidates=k, preselect="always")
        with analysis_mode(model):
            gradients = problem.gradients((tx, ty))
            # Loop variables are bound as default arguments: each closure runs within its own iteration.
            full, _ = _median(lambda s=s, settings=settings: score_training_set(problem, train, s, settings, one, None), runs)

            def always(tx=tx, ty=ty, s=s, settings=settings):
                found = find_candidates(model, (tx, ty), train, settings, one, problem.device, shared.loss_fn)
                return score_candidates(problem, train, s, found, settings, one, None), found

            always, (_, found) = _median(always, runs)

            def auto(k=k, tx=tx, ty=ty, gradients=gradients, s=s):
                auto_settings = ExplainConfig(num_candidates=k)
                chosen, _ = choose_candidates(problem, (tx, ty), gradients, train, auto_settings, one, shared.loss_fn)
                if chosen is None:
                    return score_training_set(problem, train, s, auto_settings, one, None), False
                return score_candidates(problem, train, s, chosen, auto_settings, one, None), True

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                auto, (_, preselected) = _median(auto, runs)
                estimate = estimate_preselection(problem, (tx, ty), gradients, train, settings, one, shared.loss_fn)
            probe, _ = _median(lambda tx=tx, ty=ty, gradients=gradients, settings=settings: estimate_preselection(
                problem, (tx, ty), gradients, train, settings, one, shared.loss_fn), runs)
        union = len(CandidateScoreCollector(found.indices).union())
        rows.append({
            "points": points, "fraction": fraction, "k": k, "union": union, "full": full, "always": always,
            "auto": auto, "probe": probe, "auto_preselected": preselected,
            "cheaper_path": "candidates" if always["cpu"] < full["cpu"] else "full",
            "estimate": {"feature_seconds_per_example": estimate.feature_seconds,
                         "scoring_seconds_per_example": estimate.scoring_seconds,
                         "fixed_seconds": estimate.fixed_seconds, "expected_union": estimate.expected_union,
                         "candidate_seconds": estimate.candidate_seconds, "full_seconds": estimate.full_seconds,
                         "pays": estimate.pays},
        })
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "runs": runs, "rows": rows}


def print_preselect(study: dict[str, Any]) -> None:
    for row in study["rows"]:
        full, always, auto = row["full"]["cpu"], row["always"]["cpu"], row["auto"]["cpu"]
        print(f"| {study['model']} | {row['points']} | {row['k']} | {row['union']} | {full:.3f} | {always:.3f} |"
              f" {auto:.3f} ({'candidates' if row['auto_preselected'] else 'full'}) | {row['probe']['cpu']:.3f} |"
              f" {row['estimate']['candidate_seconds']:.3f} / {row['estimate']['full_seconds']:.3f} ({row['full']['wall']:.3f}) |"
              f" {auto / min(full, always):.2f} |")


def load() -> dict[str, Any]:
    """The 1- and 5-minute load averages and the CPU count (other jobs share this machine)."""
    one, five, _ = os.getloadavg()
    return {"loadavg_1min": one, "loadavg_5min": five, "cpu_count": os.cpu_count()}


# -- driver ---------------------------------------------------------------------------------------------------
def exact_scores(model, data, test, damping) -> tuple[torch.Tensor, float, float]:
    x, y = data
    problem = problem_for(model, x, y, damping, ExactConfig())
    with Timer() as t:
        s, info = solve(problem, test)
    return full_scores(problem, s), info.eigenvalue_min, t.cpu


def run_preselect(models, data, tests, results: dict[str, Any], runs: int) -> None:
    print("\n## preselect='auto' against full scoring and forced candidates (CPU s, median of"
          f" {runs}; s_test excluded)")
    print("| model | points | k | union | full | always | auto (chose) | probe | probe's estimate, wall: candidates / full"
          " (full measured) | auto / best |\n|---|---:|---:|---:|---:|---:|---|---:|---|---:|")
    results["preselect"] = []
    for name in ("cnn", "mlp"):
        study = preselect_study(name, models[name], data, tests[name], runs)
        results["preselect"].append(study)
        print_preselect(study)


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Add the derived figures the tables print (per cent of the training set, scoring time saved, x faster, per-step
    costs) to the results of an earlier run, without running anything."""
    for study in results.get("recall", []):
        for row in study["rows"]:
            row["percent_of_train"] = 100 * row["fraction"]
            row["scoring_time_saved_percent"] = 100 * (1 - row["fast_cpu"] / study["full_scoring_cpu"])
    for study in results.get("preselect", []):
        for row in study["rows"]:
            row["percent_of_train"] = 100 * row["fraction"]
            row["auto_over_full_percent"] = 100 * (row["auto"]["cpu"] / row["full"]["cpu"] - 1)
    sbs = results.get("side_by_side")
    if sbs:
        theirs = sbs["theirs"]
        points, depth = len(theirs["pearson"]), sbs["settings"]["depth"]
        theirs["s_test_ms_per_step"] = 1000 * theirs["s_test_cpu"] / (points * depth)
        theirs["scoring_ms_per_gradient"] = 1000 * theirs["scoring_cpu"] / (points * results["n_train"])
        sbs["x_faster_cpu"] = {key: theirs["cpu"] / row["cpu"] for key, row in sbs.items()
                               if key.startswith("ours") and "cpu" in row}
        sbs["ours_full"]["steps_of_theirs_per_step"] = sbs["ours_full"]["cpu"] / depth / (theirs["s_test_cpu"] / (points * depth))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 training examples, short recursions")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--recall-only", action="store_true", help="only the recall of kNN candidates (section 1)")
    parser.add_argument("--preselect-only", action="store_true",
                        help="only preselect='auto' against full scoring and forced candidates (section 4)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per path in section 4 (median reported)")
    parser.add_argument("--derive", action="store_true",
                        help="add the derived table figures (per cent, time saved, x faster) to an existing --json file")
    args = parser.parse_args()
    if args.derive:
        args.json.write_text(json.dumps(derive(json.loads(args.json.read_text())), indent=1))
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    started = time.perf_counter()
    n_train = 300 if args.quick else 1500
    depth = 50 if args.quick else 1000
    global CHEAP_DEPTHS
    CHEAP_DEPTHS = (10, 20) if args.quick else CHEAP_DEPTHS
    (x, y), (x_held, y_held) = shared.digits(n_train)
    data = (x, y)
    epochs = {"lr": 30, "cnn": 15, "mlp": 5}
    models = {name: train(name, x, y, count) for name, count in epochs.items()}
    tests = {name: worst_points(model, x_held, y_held) for name, model in models.items()}
    damping = {"lr": 0.01, "cnn": 0.05}  # CNN: above |lambda_min| of its Hessian (printed below)
    info = shared.machine(1)
    print(f"Machine: {info['cpu']} | os.cpu_count()={info['cpu_count']} | torch {info['torch']} | 1 thread")
    print(f"Data: digits, {n_train} training examples, {NUM_POINTS} highest-loss held-out test points per model")
    results: dict[str, Any] = {"machine": info, "n_train": n_train, "quick": args.quick, "load_before": load()}
    if args.preselect_only:
        run_preselect(models, data, tests, results, args.runs)
        results["load_after"] = load()
        print(f"\nTotal wall time {time.perf_counter() - started:.0f} s;"
              f" load {results['load_before']} -> {results['load_after']}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1,
                                            default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        return

    exact = {}
    for name in () if args.recall_only else ("lr", "cnn"):
        exact[name], lam_min, cpu = exact_scores(models[name], data, tests[name], damping[name])
        print(f"exact {name}: lambda_min(H) = {lam_min:.4g}, damping {damping[name]}, {cpu:.1f} s CPU")
        results[f"exact_{name}"] = {"lambda_min": lam_min, "cpu": cpu}

    print("" if args.recall_only else f"\n## scale='auto' vs fixed scales (LiSSA depth {depth}, batch 128):"
          " Pearson with exact over all training points, mean (min) over the 8 test points")
    print("" if args.recall_only else "| model | scale | value | Pearson | converged | CPU s |\n|---|---|---:|---|:-:|---:|")
    results["scale"] = []
    for name in () if args.recall_only else ("lr", "cnn"):
        for row in scale_study(name, models[name], data, tests[name], damping[name], exact[name], {"depth": depth}):
            results["scale"].append(row)
            if "diverged" in row:
                print(f"| {name} | {row['scale']} | {row['value']:.3g} | diverged | - | - |")
            else:
                print(f"| {name} | {row['scale']} | {row['value']:.3g} | {summary(row['pearson'])} |"
                      f" {'yes' if row['converged'] else 'no'} | {row['cpu']:.1f} |")

    print("\n## Recall of kNN candidates (top-10 harmful / helpful of full scoring inside the k candidates)")
    recall_lissa = {"cnn": {"depth": depth}, "mlp": {"depth": 50 if args.quick else 300, "batch_size": 32}}
    results["recall"] = []
    print("| model | features | k | % of train | union | recall harmful | recall helpful | full scoring CPU s |"
          " features+kNN CPU s | candidate scoring CPU s | scoring time saved |"
          "\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("cnn", "mlp"):
        study = recall_study(name, models[name], data, tests[name], damping.get(name, 0.01), recall_lissa[name])
        results["recall"].append(study)
        for row in study["rows"]:
            saved = 1 - row["fast_cpu"] / study["full_scoring_cpu"]
            print(f"| {name} | {row['features']} | {row['k']} | {100 * row['fraction']:.0f} | {row['union']} |"
                  f" {row['recall_harmful']:.3f} | {row['recall_helpful']:.3f} | {study['full_scoring_cpu']:.3f} |"
                  f" {row['knn_cpu']:.3f} | {row['candidate_scoring_cpu']:.3f} | {100 * saved:.0f}% |")
        print(f"({name}: s_test LiSSA {study['lissa']}, damping {study['damping']}, {study['s_test_cpu']:.1f} s CPU,"
              f" shared by both paths)")

    if args.recall_only:
        print(f"\nTotal wall time {time.perf_counter() - started:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        return
    print("\n## Side by side with pytorch-influence-functions (CNN)")
    sbs = side_by_side(models["cnn"], data, tests["cnn"], damping["cnn"], exact["cnn"],
                       {"depth": depth, "batch_size": 128}, args.quick)
    results["side_by_side"] = sbs
    t = sbs["theirs"]
    print(f"settings: {sbs['settings']}")
    print(f"their calc_img_wise on CPU: {t['calc_img_wise']}")
    k = round(0.10 * n_train)
    rows = [
        ("pytorch-influence-functions 0.1.1 (gpu=-1)", t["cpu"], t["wall"], summary(t["pearson"])),
        ("ours, same settings, all points scored", sbs["ours_full"]["cpu"], sbs["ours_full"]["wall"],
         summary(sbs["ours_full"]["pearson"])),
        (f"ours, same settings, num_candidates={k}", sbs[f"ours_candidates_{k}"]["cpu"], sbs[f"ours_candidates_{k}"]["wall"],
         "same scores on candidates"),
        (f"ours, batch_size=1 (scale auto {sbs['ours_b1']['scale']:.3g}), num_candidates={k}",
         sbs["ours_b1_candidates"]["cpu"], sbs["ours_b1_candidates"]["wall"], summary(sbs["ours_b1"]["pearson"])),
    ]
    for depth in CHEAP_DEPTHS:
        row = sbs[f"ours_b1_depth{depth}"]
        rows.append((f"ours, batch_size=1, depth={depth}, num_candidates={k}", row["cpu"], row["wall"], summary(row["pearson"])))
    print("| run | CPU s | wall s | x faster (CPU) | Pearson with exact, mean (min) |\n|---|---:|---:|---:|---|")
    for label, cpu, wall, pearson in rows:
        print(f"| {label} | {cpu:.1f} | {wall:.1f} | {t['cpu'] / cpu:.1f} | {pearson} |")
    print(f"(theirs: s_test {t['s_test_cpu']:.1f} s CPU, scoring {t['scoring_cpu']:.1f} s CPU)")
    print(f"\nTotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


if __name__ == "__main__":
    main()
