#!/usr/bin/env python
"""Gauss-Newton vs Hessian, automatic damping and LiSSA's residual check on nets that have NOT converged.

Models (seeded; digits pixels / 16, float32; 1,200 training images, the rest test images):

* ``tanh_mlp_sgd``: 64-32-10 tanh MLP after 3 epochs of SGD (lr 0.3, weight decay 1e-3, batch 32);
* ``tanh_mlp_sgd_raw``: the same on raw pixels (0-16, not scaled): a strongly indefinite Hessian;
* ``relu_mlp_adam``: 64-32-10 ReLU MLP after 5 epochs of Adam (lr 1e-3, no weight decay, batch 32);
* ``bn_cnn``: conv-BatchNorm-ReLU x2 + linear head after 3 epochs of Adam, analysed in eval mode;
* ``transformer``: a 1-layer ``nn.TransformerEncoder`` classifier (d=16) on generated token sequences (the
  class is which of 4 marker tokens occurs most often), 3 epochs of Adam.

For each model, with the package's defaults (LiSSA depth 1000, batch 128, scale auto, curvature
``gauss_newton``, damping ``auto``; the weight decay passed where training used one), on the 5 highest-loss
test points:

* did it answer, the damping chosen (and its rule), worst residual ``||(G + lambda I) x - v|| / ||v||``, retries,
  steps and seconds;
* Pearson and top-10 overlap (by ``|I|``) of the training-set influence scores against the exact GGN solve at
  the reported damping (dense G, eigendecomposition, float64);
* leave-one-out: for the 2 highest-loss test points, the 6 training examples with the largest ``|I|`` under
  the exact GGN solve; each is removed and the model retrained from the trained weights for ``RETRAIN_STEPS``
  full-batch gradient steps (deterministic; the baseline runs the same steps with every example). Pearson of
  the actual test-loss change with ``-I / n`` predicted by LiSSA-GGN (defaults) and by LiSSA-Hessian
  (``curvature="hessian"``, damping auto, which the negative-curvature check raises above ``|lambda_min|``).

Also: the damping fraction sweep (``damping = f * lambda_max`` for f in ``FRACTIONS``; LiSSA vs exact at that
damping) and ``scale="auto"``'s failure rate (divergence without retries) over seeds and batch sizes.

Writes ``benchmarks/curvature-results.json``. Usage: ``python benchmarks/curvature.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from scipy.stats import pearsonr
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_influence import config as defaults
from lightning_influence.config import ExactConfig, LissaConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers.exact import ExactInverse
from lightning_influence.core.solvers.neumann import LissaDivergenceError
from lightning_influence.core.tensors.modes import analysis_mode

N_TRAIN = 1200
N_TEST_POINTS = 5
LOO_POINTS = 2
LOO_EXAMPLES = 6
RETRAIN_STEPS = 60
RETRAIN_LR = 0.2  # capped at 0.5 / lambda_max(Hessian) so that the retraining itself is stable
FRACTIONS = (0.003, 0.01, 0.03, 0.1)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "curvature-results.json")


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class BNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        )
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int = 12, d: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def digits_data(raw: bool = False) -> tuple[torch.Tensor, ...]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images if raw else images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def token_data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    n = N_TRAIN + 400
    tokens = torch.randint(4, 12, (n, 10), generator=g)
    markers = torch.randint(0, 4, (n, 6), generator=g)
    slots = torch.rand(n, 10, generator=g).argsort(dim=1)[:, :6]
    tokens.scatter_(1, slots, markers)
    counts = F.one_hot(markers, 4).sum(dim=1).float() + 0.1 * torch.arange(4)  # ties: the higher marker
    labels = counts.argmax(dim=1)
    return tokens[:N_TRAIN], labels[:N_TRAIN], tokens[N_TRAIN:], labels[N_TRAIN:]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, epochs: int) -> None:
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            optimizer.zero_grad()
            loss_fn(model, (x[idx], y[idx])).mean().backward()
            optimizer.step()
    model.eval()


def build(name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    if name == "transformer":
        x, y, xt, yt = token_data()
    else:
        x, y, xt, yt = digits_data(raw=name.endswith("_raw"))
        if name == "bn_cnn":
            x, xt = x.reshape(-1, 1, 8, 8), xt.reshape(-1, 1, 8, 8)
    weight_decay = None
    if name.startswith("tanh_mlp_sgd"):
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        weight_decay = 1e-3
        train(model, x, y, torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=weight_decay), 3)
    elif name == "relu_mlp_adam":
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        train(model, x, y, torch.optim.Adam(model.parameters(), lr=1e-3), 5)
    elif name == "bn_cnn":
        model = BNCNN()
        train(model, x, y, torch.optim.Adam(model.parameters(), lr=3e-3), 3)
    else:
        model = TokenClassifier()
        train(model, x, y, torch.optim.Adam(model.parameters(), lr=3e-3), 3)
    with torch.no_grad():
        test_losses = loss_fn(model, (xt, yt))
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    worst = test_losses.topk(N_TEST_POINTS).indices
    return {"model": model, "x": x, "y": y, "test": (xt[worst], yt[worst]), "weight_decay": weight_decay,
            "test_accuracy": accuracy, "train_loss": float(loss_fn(model, (x, y)).mean().detach())}


def loader(setup: dict[str, Any]) -> DataLoader:
    return DataLoader(TensorDataset(setup["x"], setup["y"]), batch_size=256)


def problem_for(setup: dict[str, Any], config: Any, **kwargs: Any) -> InfluenceProblem:
    kwargs.setdefault("weight_decay", setup["weight_decay"])
    kwargs.setdefault("damping", "auto")
    damping = kwargs.pop("damping")
    return InfluenceProblem(setup["model"], loss_fn, loader(setup), damping, config, **kwargs)


def all_gradients(problem: InfluenceProblem) -> torch.Tensor:
    return torch.cat([problem.gradients(batch) for batch in problem.train_loader])


def compare(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    pearson = [float(pearsonr(a.double().numpy(), b.double().numpy())[0]) for a, b in zip(scores, reference)]
    overlap = [len(set(a.abs().topk(10).indices.tolist()) & set(b.abs().topk(10).indices.tolist())) / 10
               for a, b in zip(scores, reference)]
    return {"pearson_min": min(pearson), "pearson_mean": sum(pearson) / len(pearson),
            "top10_overlap_min": min(overlap), "top10_overlap_mean": sum(overlap) / len(overlap)}


def lissa_run(setup: dict[str, Any], grads: torch.Tensor, test_grads: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
    config = kwargs.pop("config", LissaConfig())
    problem = problem_for(setup, config, **kwargs)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, analysis_mode(setup["model"]):
        warnings.simplefilter("always")
        try:
            result = problem.solve(test_grads)
        except LissaDivergenceError as error:
            return {"answered": False, "error": str(error)[:400], "seconds": time.perf_counter() - start}
    info = result.info
    return {
        "answered": True, "damping": info.damping, "damping_rule": info.damping_rule,
        "eigenvalue_max": info.eigenvalue_max, "eigenvalue_min": info.eigenvalue_min,
        "residual": info.residual, "converged": info.converged, "retries": len(info.retries),
        "steps": info.iterations, "scale": info.scale, "seconds": time.perf_counter() - start,
        "warnings": list(info.warnings) + [str(w.message)[:200] for w in caught if str(w.message) not in info.warnings],
        "scores": -(result.vectors @ grads.T),
    }


def exact_scores(eigh: tuple[torch.Tensor, torch.Tensor], damping: float, grads: torch.Tensor,
                 test_grads: torch.Tensor) -> torch.Tensor:
    s = ExactInverse(eigh[0], eigh[1], damping).solve(test_grads.double())
    return -(s @ grads.double().T)


def retrain_test_losses(setup: dict[str, Any], removed: list[int | None]) -> list[torch.Tensor]:
    """Test losses after ``RETRAIN_STEPS`` full-batch gradient steps from the trained weights, one run per entry
    of ``removed`` (None: every example). Same objective as training (mean CE + weight decay / 2 ||theta||^2)."""
    x, y = setup["x"], setup["y"]
    wd = setup["weight_decay"] or 0.0
    lr = min(RETRAIN_LR, 0.5 / setup["hessian_eigenvalue_max"])
    xt, yt = setup["test"]
    base = {k: v.detach().clone() for k, v in setup["model"].named_parameters()}
    buffers = {k: v for k, v in setup["model"].named_buffers()}
    model = setup["model"]
    out = []
    for index in removed:
        weights = torch.ones(len(y))
        if index is not None:
            weights[index] = 0.0
        params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        for _ in range(RETRAIN_STEPS):
            losses = loss_fn_functional(model, params, buffers, (x, y))
            objective = (weights * losses).sum() / len(y) + 0.5 * wd * sum((p**2).sum() for p in params.values())
            grads = torch.autograd.grad(objective, list(params.values()))
            with torch.no_grad():
                params = {k: (p - lr * g).requires_grad_(True) for (k, p), g in zip(params.items(), grads)}
        with torch.no_grad():
            out.append(loss_fn_functional(model, params, buffers, (xt[:LOO_POINTS], yt[:LOO_POINTS])))
    return out


def loss_fn_functional(model: nn.Module, params: dict, buffers: dict, batch: Any) -> torch.Tensor:
    logits = torch.func.functional_call(model, {**params, **buffers}, (batch[0],))
    return F.cross_entropy(logits, batch[1], reduction="none")


def leave_one_out(setup: dict[str, Any], reference: torch.Tensor, predictions: dict[str, torch.Tensor]) -> dict:
    n = len(setup["y"])
    chosen = [reference[p].abs().topk(LOO_EXAMPLES).indices.tolist() for p in range(LOO_POINTS)]
    flat = sorted({i for c in chosen for i in c})
    with analysis_mode(setup["model"]):
        losses = retrain_test_losses(setup, [None, *flat])
    base, after = losses[0], dict(zip(flat, losses[1:]))
    actual = [float(after[i][p] - base[p]) for p in range(LOO_POINTS) for i in chosen[p]]
    result: dict[str, Any] = {"actual_mean_abs": sum(abs(a) for a in actual) / len(actual),
                              "retrain_lr": min(RETRAIN_LR, 0.5 / setup["hessian_eigenvalue_max"])}
    for name, scores in predictions.items():
        result[name] = loo_agreement(scores, chosen, actual, n)
    setup["loo"] = (chosen, actual)
    return result


def loo_agreement(scores: torch.Tensor, chosen: list[list[int]], actual: list[float], n: int) -> dict[str, float]:
    predicted = [float(-scores[p, i] / n) for p in range(LOO_POINTS) for i in chosen[p]]
    return {"pearson": float(pearsonr(predicted, actual)[0]),
            "sign_agreement": sum((a > 0) == (b > 0) for a, b in zip(predicted, actual)) / len(actual)}


def scale_failure_rate(setup: dict[str, Any], test_grads: torch.Tensor, seeds: int, sizes: tuple[int, ...]) -> dict:
    """LiSSA with scale='auto' and no retries: how often does it diverge (per batch size, over seeds)?"""
    out = {}
    for size in sizes:
        failures = 0
        for seed in range(seeds):
            config = LissaConfig(depth=300, batch_size=size, seed=seed, max_retries=0, check_every=0)
            problem = problem_for(setup, config)
            with analysis_mode(setup["model"]):
                try:
                    problem.solve(test_grads)
                except LissaDivergenceError:
                    failures += 1
        out[str(size)] = {"failures": failures, "runs": seeds}
    return out


def run_model(name: str, quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    setup = build(name)
    exact_problem = problem_for(setup, ExactConfig())
    with analysis_mode(setup["model"]):
        grads = all_gradients(exact_problem)
        test_grads = exact_problem.gradients(setup["test"])
        eigh = exact_problem.curvature_eigh()
    ggn_w = eigh[0]
    dense = "mlp" in name  # the dense Hessian of the CNN/transformer costs minutes: Lanczos there
    hessian_problem = problem_for(setup, ExactConfig() if dense else LissaConfig(), curvature="hessian",
                                  allow_negative_curvature=True, damping=0.0)
    with analysis_mode(setup["model"]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dense:
            hess_w = hessian_problem.curvature_eigh()[0]
        else:
            found = hessian_problem.spectrum()
            hess_w = torch.tensor([found.bottom, found.top])
    setup["hessian_eigenvalue_max"] = float(hess_w[-1])
    row: dict[str, Any] = {
        "parameters": exact_problem.num_params, "train_loss": setup["train_loss"],
        "test_accuracy": setup["test_accuracy"], "ggn_eigenvalue_max": float(ggn_w[-1]),
        "hessian_eigenvalue_min": float(hess_w[0]), "hessian_eigenvalue_max": float(hess_w[-1]),
        "hessian_negative_eigenvalues": int((hess_w < 0).sum()) if dense else None,
        "hessian_spectrum": "exact (dense)" if dense else f"Lanczos, {defaults.SPECTRUM_STEPS} steps",
    }
    default = lissa_run(setup, grads, test_grads)
    scores = default.pop("scores", None)
    row["default"] = default
    if scores is not None:
        reference = exact_scores(eigh, default["damping"], grads, test_grads)
        row["default"].update(compare(scores, reference))
        hessian = lissa_run(setup, grads, test_grads, curvature="hessian")
        hessian_scores = hessian.pop("scores", None)
        row["hessian_default"] = hessian
        predictions = {"gauss_newton_lissa": scores, "gauss_newton_exact": reference}
        if hessian_scores is not None:
            predictions["hessian_lissa"] = hessian_scores
        row["leave_one_out"] = leave_one_out(setup, reference, predictions)
    sweep = {}
    fractions = FRACTIONS if "mlp" in name else (0.01, 0.03)
    for fraction in fractions if not quick else (defaults.AUTO_DAMPING_FRACTION,):
        damping = fraction * float(ggn_w[-1])
        if fraction == defaults.AUTO_DAMPING_FRACTION and setup.get("weight_decay") is None and scores is not None:
            run, run_scores = dict(default), scores  # the default run is this one
        else:
            run = lissa_run(setup, grads, test_grads, damping=damping)
            run_scores = run.pop("scores", None)
        if run_scores is not None:
            exact = exact_scores(eigh, damping, grads, test_grads)
            run.update(compare(run_scores, exact))
            if "loo" in setup:
                chosen, actual = setup["loo"]
                run["loo_pearson_lissa"] = loo_agreement(run_scores, chosen, actual, len(setup["y"]))["pearson"]
                run["loo_pearson_exact"] = loo_agreement(exact, chosen, actual, len(setup["y"]))["pearson"]
        sweep[str(fraction)] = {k: run[k] for k in ("answered", "damping", "residual", "converged", "steps",
                                                    "pearson_min", "top10_overlap_min", "loo_pearson_lissa",
                                                    "loo_pearson_exact", "seconds") if k in run}
    row["fraction_sweep"] = sweep
    if "mlp" in name:
        row["scale_auto_failures"] = scale_failure_rate(setup, test_grads, 2 if quick else 3, (8, 32, 128))
    elif name == "bn_cnn":
        row["scale_auto_failures"] = scale_failure_rate(setup, test_grads, 2, (8, 32))
    row["seconds"] = time.perf_counter() - t0
    return row


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def negatives(row: dict[str, Any]) -> str:
    count = row["hessian_negative_eigenvalues"]
    return "Lanczos" if count is None else f"{count} < 0"


def print_tables(results: dict[str, Any]) -> None:
    """The markdown tables of docs/curvature.md, from the results file."""
    print("| model | params | Hessian eigenvalues | answered | damping (auto) | worst residual | converged | retries |"
          " steps | s | Pearson min vs exact GGN | top-10 overlap min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results["models"].items():
        d = row["default"]
        print(f"| {name} | {row['parameters']} | [{fmt(row['hessian_eigenvalue_min'])}, "
              f"{fmt(row['hessian_eigenvalue_max'])}] ({negatives(row)}) | {fmt(d['answered'])}"
              f" | {fmt(d.get('damping'))} | {fmt(d.get('residual'), 2)} | {fmt(d.get('converged'))} |"
              f" {d.get('retries', '-')} | {d.get('steps', '-')} | {fmt(d['seconds'], 2)} | {fmt(d.get('pearson_min'), 4)} |"
              f" {fmt(d.get('top10_overlap_min'), 2)} |")
    print()
    print("| model | Hessian LiSSA damping (auto, checked) | its residual (converged) | LOO Pearson: GGN LiSSA | GGN exact |"
          " Hessian LiSSA | mean abs LOO change |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results["models"].items():
        h, loo = row.get("hessian_default", {}), row.get("leave_one_out", {})
        print(f"| {name} | {fmt(h.get('damping'))} | {fmt(h.get('residual'), 2)} ({fmt(h.get('converged'))}) |"
              f" {fmt(loo.get('gauss_newton_lissa', {}).get('pearson'), 3)} |"
              f" {fmt(loo.get('gauss_newton_exact', {}).get('pearson'), 3)} |"
              f" {fmt(loo.get('hessian_lissa', {}).get('pearson'), 3)} | {fmt(loo.get('actual_mean_abs'), 2)} |")
    print()
    print("| model | fraction | damping | worst residual | steps | Pearson min | top-10 min | LOO Pearson (LiSSA / exact) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results["models"].items():
        for fraction, run in row["fraction_sweep"].items():
            print(f"| {name} | {fraction} | {fmt(run.get('damping'))} | {fmt(run.get('residual'), 2)} |"
                  f" {run.get('steps', '-')} | {fmt(run.get('pearson_min'), 4)} | {fmt(run.get('top10_overlap_min'), 2)} |"
                  f" {fmt(run.get('loo_pearson_lissa'), 3)} / {fmt(run.get('loo_pearson_exact'), 3)} |")
    print()
    for name, row in results["models"].items():
        if "scale_auto_failures" in row:
            cells = ", ".join(f"B={b}: {v['failures']}/{v['runs']}" for b, v in row["scale_auto_failures"].items())
            print(f"- {name}: scale='auto' divergences without retries: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the docs tables from the results file")
    parser.add_argument("--out", default=OUT, help="results file (runs of some models merge into it)")
    parser.add_argument("--models", default="tanh_mlp_sgd,tanh_mlp_sgd_raw,relu_mlp_adam,bn_cnn,transformer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table:
        with open(args.out) as f:
            print_tables(json.load(f))
        return
    results: dict[str, Any] = {
        "settings": {
            "n_train": N_TRAIN, "test_points": N_TEST_POINTS, "lissa": "LissaConfig() defaults",
            "auto_damping_fraction": defaults.AUTO_DAMPING_FRACTION, "residual_tol": defaults.RESIDUAL_TOL,
            "check_every": defaults.CHECK_EVERY, "subset_examples": defaults.SUBSET_EXAMPLES,
            "retrain": f"{RETRAIN_STEPS} full-batch GD steps, lr {RETRAIN_LR}, from the trained weights",
            "loo": f"{LOO_POINTS} test points x {LOO_EXAMPLES} largest |I| (exact GGN) training examples",
        },
        "models": {},
    }
    if os.path.exists(args.out) and args.models != parser.get_default("models"):
        with open(args.out) as f:
            results["models"] = json.load(f).get("models", {})
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        results["models"][name] = run_model(name, args.quick)
        print(json.dumps(results["models"][name], indent=1, default=str), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
