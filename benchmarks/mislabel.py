#!/usr/bin/env python
"""Finding flipped labels by self-influence, against training loss, random order and cleanlab.

scikit-learn's digits (pixels / 16), a seeded split of 1,200 training / 597 test images, and 10% of the
*training* labels (120) flipped to a different, random class. Two models:

* **lr**: logistic regression (``nn.Linear(64, 10)``) trained to convergence by full-batch L-BFGS on
  ``mean CE + l2/2 ||theta||^2`` with ``l2 = 1e-3``;
* **mlp**: a 64-64-10 tanh MLP (4,810 parameters) trained by full-batch Adam (weight decay 1e-4) until it
  fits the flipped labels (training accuracy reported; 100% in every run so far).

Each model ranks the training set by

* self-influence ``I(z, z) = -g^T (H + damping I)^-1 g`` (most negative first) with ``solver="lowrank"``
  (rank 64, 128 Lanczos steps), at damping ``l2`` for lr (where ``H + l2 I`` is exactly the Hessian of the
  training objective) and at several dampings for mlp; ``solver="exact"`` as the reference for lr;
* training loss, highest first;
* the per-example gradient norm ``||grad L(z)||`` (no Hessian: what self-influence adds ``H^-1`` to);
* a random order;
* cleanlab ``find_label_issues`` on 5-fold cross-validated predicted probabilities (sklearn
  ``LogisticRegression`` with the matching L2 for lr; the same MLP and recipe trained per fold for mlp):
  the issues it flags, ranked by self-confidence, then every other example by the same score, so that
  the top 5/10/20/30% are defined; and cleanlab's self-confidence label-quality score on its own.

For each ranking: the fraction of the 120 flips among the top 5, 10, 20, 30% of the training set (recall at
k, torchmetrics; at 5% the ceiling is 0.5, 60 checks for 120 flips), and the test accuracy after restoring
the true labels of the flips found in the top 10% and retraining with the same seed, against no fix and
fixing all flips. Mean +- std over seeds, and the paired per-seed differences at 10% between the main
self-influence ranking (lr: damping 1e-3; mlp: 1e-2) and every other ranking, with wins / ties / losses.
See ``docs/mislabel.md`` for a full run and its reading.

Usage::

    python benchmarks/mislabel.py                  # 3 seeds, about 4 minutes on 2 cores
    python benchmarks/mislabel.py --quick          # 1 seed, 400 epochs, 3 folds: a smoke run (~35 s)
    python benchmarks/mislabel.py --seeds 5 --json mislabel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.retrieval import retrieval_recall

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_influence import self_influence
from lightning_influence.core.eigen import lanczos
from lightning_influence.core.hvp import dataset_hvp
from lightning_influence.core.losses import FunctionalLoss
from lightning_influence.core.params import trainable_parameters

N_TRAIN = 1200
FLIP_FRACTION = 0.10
FRACTIONS = (0.05, 0.10, 0.20, 0.30)
FIX_FRACTION = 0.10
LR_L2 = 1e-3
MLP_HIDDEN = 64
MLP_WEIGHT_DECAY = 1e-4
MLP_LR = 1e-2
MLP_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
MLP_MAIN_DAMPING = 1e-2  # the one compared with the training-loss ranking in the notes
RANK = 64
FOLDS = 5
LAMBDA_MIN_STEPS = 128


# -- data ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One seeded split with flipped training labels."""

    x_train: torch.Tensor
    y_noisy: torch.Tensor
    y_true: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    flipped: torch.Tensor  # bool [n_train]

    def fixed_labels(self, order: torch.Tensor, fraction: float) -> torch.Tensor:
        """Noisy labels with the flips among the top ``fraction`` of ``order`` restored (a reviewer's fix)."""
        checked = order[: round(fraction * len(order))]
        found = checked[self.flipped[checked]]
        labels = self.y_noisy.clone()
        labels[found] = self.y_true[found]
        return labels


def make_task(seed: int) -> Task:
    images, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(images / 16.0, dtype=torch.float64), torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(len(y), generator=generator)
    train, test = permutation[:N_TRAIN], permutation[N_TRAIN:]
    flips = torch.randperm(N_TRAIN, generator=generator)[: int(FLIP_FRACTION * N_TRAIN)]
    y_noisy = y[train].clone()
    y_noisy[flips] = (y_noisy[flips] + torch.randint(1, 10, (len(flips),), generator=generator)) % 10
    flipped = torch.zeros(N_TRAIN, dtype=torch.bool)
    flipped[flips] = True
    return Task(x[train], y_noisy, y[train], x[test], y[test], flipped)


def per_example_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets, reduction="none")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


# -- models ----------------------------------------------------------------------------------------------------
def train_lr(x: torch.Tensor, y: torch.Tensor, seed: int, settings: Settings) -> nn.Module:
    """``nn.Linear(64, 10)`` at the minimum of ``mean CE + l2/2 ||theta||^2`` (L-BFGS, strong Wolfe)."""
    del seed  # convex: the minimum does not depend on the start
    model = nn.Linear(64, 10).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    optimiser = torch.optim.LBFGS(
        model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14, history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        objective = F.cross_entropy(model(x), y) + 0.5 * LR_L2 * sum((p**2).sum() for p in model.parameters())
        objective.backward()
        return objective

    for _ in range(5):
        optimiser.step(closure)
    return model


def train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, settings: Settings) -> nn.Module:
    """A 64-64-10 tanh MLP, full-batch Adam with small weight decay, seeded init: it memorises its labels."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, MLP_HIDDEN), nn.Tanh(), nn.Linear(MLP_HIDDEN, 10)).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
    for _ in range(settings.mlp_epochs):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


def gradient_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float) -> float:
    """``||grad (mean CE + l2/2 ||theta||^2)||``: how close training got to a stationary point."""
    params = list(model.parameters())
    objective = F.cross_entropy(model(x), y) + 0.5 * l2 * sum((p**2).sum() for p in params)
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)]).norm())


def hessian_extremes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest Ritz values of H (mean loss, no L2) from 128 Lanczos steps on the full set."""
    loss = FunctionalLoss(model, per_example_loss)
    params = trainable_parameters(model)
    size = sum(p.numel() for p in params.values())
    batches = [(x, y)]
    values, _ = lanczos(
        lambda v: dataset_hvp(loss, params, batches, v), size, LAMBDA_MIN_STEPS,
        generator=torch.Generator().manual_seed(0), like=next(iter(params.values())),
    )
    return float(values.min()), float(values.max())


# -- rankings: each returns training indices, most suspicious first --------------------------------------------
def self_influence_order(model: nn.Module, task: Task, solver: str, damping: float) -> tuple[torch.Tensor, float]:
    loader = DataLoader(TensorDataset(task.x_train, task.y_noisy), batch_size=256)
    options: dict[str, Any] = {"rank": RANK} if solver == "lowrank" else {}
    start = time.perf_counter()
    scores = self_influence(model, per_example_loss, loader, solver=solver, damping=damping, **options)
    seconds = time.perf_counter() - start
    return torch.argsort(scores, stable=True), seconds  # most negative I(z, z) = largest |I| first


def loss_order(model: nn.Module, task: Task) -> torch.Tensor:
    with torch.no_grad():
        losses = per_example_loss(model, (task.x_train, task.y_noisy))
    return torch.argsort(losses, descending=True, stable=True)


def gradient_norm_order(model: nn.Module, task: Task) -> torch.Tensor:
    """Per-example ``||grad L(z)||`` (no Hessian at all), largest first: what self-influence adds H^-1 to."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x[None],)), y[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, task.x_train, task.y_noisy)
    norms = torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)
    return torch.argsort(norms, descending=True, stable=True)


def rank_agreement(first: torch.Tensor, second: torch.Tensor, fraction: float) -> tuple[float, float]:
    """Spearman correlation of two orders over all examples, and the overlap of their top ``fraction``."""
    positions = [torch.empty(len(o), dtype=torch.float64) for o in (first, second)]
    for position, order in zip(positions, (first, second)):
        position[order] = torch.arange(len(order), dtype=torch.float64)
    top = round(fraction * len(first))
    overlap = len(set(first[:top].tolist()) & set(second[:top].tolist())) / top
    return float(spearman_corrcoef(positions[0], positions[1])), overlap


def random_order(seed: int) -> torch.Tensor:
    return torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(10_000 + seed))


def cv_probabilities_lr(task: Task, seed: int, settings: Settings) -> np.ndarray:
    """Out-of-fold probabilities of sklearn's LogisticRegression with the same L2 as ``train_lr``.

    sklearn minimises ``1/2 ||w||^2 + C sum_i CE_i``; ours is ``mean CE + l2/2 ||w||^2``, the same up to a factor
    when ``C = 1 / (l2 n_fold)`` (sklearn leaves the intercept unpenalised).
    """
    n_fold = N_TRAIN * (settings.folds - 1) / settings.folds
    classifier = LogisticRegression(C=1.0 / (LR_L2 * n_fold), max_iter=5000)
    folds = StratifiedKFold(settings.folds, shuffle=True, random_state=seed)
    return cross_val_predict(
        classifier, task.x_train.numpy(), task.y_noisy.numpy(), cv=folds, method="predict_proba"
    )


def cv_probabilities_mlp(task: Task, seed: int, settings: Settings) -> np.ndarray:
    """Out-of-fold probabilities of the same MLP and recipe as ``train_mlp``, trained once per fold."""
    folds = StratifiedKFold(settings.folds, shuffle=True, random_state=seed)
    probabilities = np.zeros((N_TRAIN, 10))
    for fit, held_out in folds.split(task.x_train.numpy(), task.y_noisy.numpy()):
        model = train_mlp(task.x_train[fit], task.y_noisy[fit], seed, settings)
        with torch.no_grad():
            probabilities[held_out] = model(task.x_train[held_out]).softmax(dim=1).numpy()
    return probabilities


def cleanlab_orders(task: Task, probabilities: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(flagged issues then the rest, self-confidence alone, number flagged)``; ties broken by index."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = task.y_noisy.numpy()
    issues = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    by_quality = np.argsort(quality, kind="stable")
    flagged = {int(i) for i in issues}
    rest = [int(i) for i in by_quality if int(i) not in flagged]
    combined = torch.tensor([int(i) for i in issues] + rest)
    return combined, torch.from_numpy(by_quality.copy()), len(issues)


# -- metrics ---------------------------------------------------------------------------------------------------
def recall_at(order: torch.Tensor, flipped: torch.Tensor, fraction: float) -> float:
    """Fraction of all flips among the first ``fraction`` of ``order`` (torchmetrics' retrieval recall@k)."""
    preds = torch.empty(len(order), dtype=torch.float64)
    preds[order] = torch.arange(len(order), 0, -1, dtype=torch.float64)  # earlier = higher score
    return float(retrieval_recall(preds, flipped, top_k=round(fraction * len(order))))


@dataclass
class Settings:
    seeds: list[int]
    mlp_epochs: int
    folds: int
    mlp_dampings: tuple[float, ...]


@dataclass
class ModelResult:
    """Per-method lists over seeds: recalls per fraction and test accuracy after the top-10% fix."""

    recalls: dict[str, list[list[float]]] = field(default_factory=dict)
    fixed_accuracy: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: Any, table: str = "notes") -> None:
        getattr(self, table).setdefault(key, []).append(value)


def run_model(
    name: str, train: Callable[..., nn.Module], task: Task, seed: int, settings: Settings, result: ModelResult
) -> None:
    start = time.perf_counter()
    model = train(task.x_train, task.y_noisy, seed, settings)
    result.add("train seconds", time.perf_counter() - start)
    result.add("train accuracy (noisy labels)", accuracy(model, task.x_train, task.y_noisy))
    result.add("train accuracy on the flips (given label)", accuracy(model, task.x_train[task.flipped],
                                                                     task.y_noisy[task.flipped]))
    l2 = LR_L2 if name == "lr" else MLP_WEIGHT_DECAY
    result.add("gradient norm of the objective", gradient_norm(model, task.x_train, task.y_noisy, l2))
    with torch.no_grad():
        losses = per_example_loss(model, (task.x_train, task.y_noisy))
    result.add("median training loss, flips", float(losses[task.flipped].median()))
    result.add("median training loss, clean", float(losses[~task.flipped].median()))
    low, high = hessian_extremes(model, task.x_train, task.y_noisy)
    result.add("Hessian lambda_min (Lanczos)", low)
    result.add("Hessian lambda_max (Lanczos)", high)

    orders: dict[str, torch.Tensor] = {
        "random": random_order(seed),
        "training loss": loss_order(model, task),
        "gradient norm": gradient_norm_order(model, task),
    }
    dampings = (LR_L2,) if name == "lr" else settings.mlp_dampings
    for damping in dampings:
        key = f"self-influence lowrank d={damping:g}"
        orders[key], seconds = self_influence_order(model, task, "lowrank", damping)
        result.add(key, seconds, "seconds")
    if name == "lr":
        key = f"self-influence exact d={LR_L2:g}"
        orders[key], seconds = self_influence_order(model, task, "exact", LR_L2)
        result.add(key, seconds, "seconds")
    start = time.perf_counter()
    probabilities = (cv_probabilities_lr if name == "lr" else cv_probabilities_mlp)(task, seed, settings)
    combined, by_quality, flagged = cleanlab_orders(task, probabilities)
    result.add("cleanlab find_label_issues", time.perf_counter() - start, "seconds")
    result.add("cleanlab flagged", flagged)
    result.add("cleanlab flagged precision", float(task.flipped[combined[:flagged]].double().mean()))
    orders["cleanlab find_label_issues"] = combined
    orders["cleanlab self-confidence"] = by_quality

    spearman, overlap = rank_agreement(orders[main_key(name)], orders["training loss"], FIX_FRACTION)
    result.add("self-influence vs training loss: Spearman", spearman)
    result.add("self-influence vs training loss: top-10% overlap", overlap)
    for key, order in orders.items():
        result.add(key, [recall_at(order, task.flipped, f) for f in FRACTIONS], "recalls")
    baselines = {"no fix": task.y_noisy, "fix all flips": task.y_true}
    fixes = {**baselines, **{key: task.fixed_labels(order, FIX_FRACTION) for key, order in orders.items()}}
    for key, labels in fixes.items():
        retrained = train(task.x_train, labels, seed, settings)
        result.add(key, accuracy(retrained, task.x_test, task.y_test), "fixed_accuracy")


# -- output ----------------------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def main_key(name: str) -> str:
    """The self-influence ranking each model is judged by (lr: damping = its L2; mlp: MLP_MAIN_DAMPING)."""
    return f"self-influence lowrank d={LR_L2 if name == 'lr' else MLP_MAIN_DAMPING:g}"


def print_paired(result: ModelResult, main: str) -> None:
    """Per-seed differences at the top 10%: ``main`` minus each other ranking, with wins / ties / losses."""
    column = FRACTIONS.index(FIX_FRACTION)
    print(f"Paired over seeds, top {FIX_FRACTION:.0%}: `{main}` minus each ranking (mean +- std; wins/ties/losses)")
    print()
    for key, recalls in result.recalls.items():
        if key == main:
            continue
        diffs = [a[column] - b[column] for a, b in zip(result.recalls[main], recalls)]
        wins, losses = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
        print(f"- vs {key}: {mean_std(diffs, 3)} ({wins}/{len(diffs) - wins - losses}/{losses})")


def print_model(name: str, title: str, result: ModelResult, seeds: int) -> None:
    header = ["ranking"] + [f"top {f:.0%}" for f in FRACTIONS] + ["test acc, top-10% fixed"]
    rows = [header, ["---"] * len(header)]
    for key in ("no fix", "fix all flips"):
        rows.append([f"({key})"] + ["" for _ in FRACTIONS] + [mean_std(result.fixed_accuracy[key], 3)])
    for key, recalls in result.recalls.items():
        columns = list(zip(*recalls))
        rows.append([key] + [mean_std(list(c)) for c in columns] + [mean_std(result.fixed_accuracy[key], 3)])
    print(f"\n### {title}: fraction of the {int(FLIP_FRACTION * N_TRAIN)} flipped labels found in the top k% "
          f"(mean +- std over {seeds} seeds)\n")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print_paired(result, main_key(name))
    print()
    for key, values in result.notes.items():
        digits = 2 if key == "cleanlab flagged" else 3
        text = mean_std([float(v) for v in values], digits) if "lambda" not in key and "norm" not in key else (
            ", ".join(f"{v:.3g}" for v in values))
        print(f"- {key}: {text}")
    for key, values in result.seconds.items():
        print(f"- seconds, {key}: {mean_std(values, 2)}")


def to_json(results: dict[str, ModelResult], settings: Settings, seconds: float) -> dict[str, Any]:
    return {
        "settings": {**settings.__dict__, "fractions": FRACTIONS, "n_train": N_TRAIN, "rank": RANK},
        "machine": machine(),
        "seconds": seconds,
        "models": {name: r.__dict__ for name, r in results.items()},
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def parse(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (splits, flips, inits)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 400 MLP epochs, 3 folds")
    parser.add_argument("--mlp-epochs", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.quick:
        return Settings([0], 400, 3, (1e-3, MLP_MAIN_DAMPING)), args
    return Settings(list(range(args.seeds)), args.mlp_epochs, FOLDS, MLP_DAMPINGS), args


def main(argv: list[str] | None = None) -> None:
    settings, args = parse(argv)
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    print(f"settings: {settings}")
    start = time.perf_counter()
    results = {"lr": ModelResult(), "mlp": ModelResult()}
    for seed in settings.seeds:
        task = make_task(seed)
        for name, train in (("lr", train_lr), ("mlp", train_mlp)):
            run_model(name, train, task, seed, settings, results[name])
        print(f"seed {seed} done at {time.perf_counter() - start:.0f} s", flush=True)
    titles = {
        "lr": f"Logistic regression (L-BFGS, L2 {LR_L2:g})",
        "mlp": f"MLP 64-{MLP_HIDDEN}-10 tanh (Adam, weight decay {MLP_WEIGHT_DECAY:g}, {settings.mlp_epochs} epochs)",
    }
    for name, result in results.items():
        print_model(name, titles[name], result, len(settings.seeds))
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(to_json(results, settings, total), indent=1) + "\n")


if __name__ == "__main__":
    main()
