#!/usr/bin/env python
"""Influence vs leave-one-out retraining on digits: logistic regression and a small CNN.

scikit-learn's digits (pixels / 16, float64), a seeded split of ``--train`` training images (default 1,000)
and the rest as test images. Two models, both trained on ``mean CE + l2/2 ||theta||^2``:

* **lr**: logistic regression (``nn.Linear(64, 10)``, 650 parameters), ``l2 = 1e-2``, full-batch L-BFGS to
  convergence (a strictly convex objective: influence should be close to exact);
* **cnn**: two tanh conv layers and a linear head (2,490 parameters), ``l2 = 1e-2`` (weight decay, as in Basu
  et al.'s small CNN), full-batch Adam then L-BFGS (a non-convex, near-stationary fit).

The test point is the highest-loss test image (Basu et al.'s choice). For each model and solver
``verify_leave_one_out`` removes the ``--points`` training examples with the largest ``|I|``, retrains from the
trained weights for ``--steps`` full-batch L-BFGS steps (the same for the baseline with every example), and
correlates the predicted test-loss change ``-I / n`` with the actual one. The influence uses ``damping = l2``,
so ``H + damping I`` is the Hessian of the training objective; solvers: ``exact`` (eigendecomposition) and
``lissa`` (the package's defaults: depth 1000, batch 128, scale auto; repeats 4).

Prints a table with Pearson and Spearman and the published figures for comparison; process CPU time and
wall time per row. See ``docs/trust.md`` for a run.

Usage::

    python benchmarks/loo.py                # both models, about 2-3 minutes on 1 core
    python benchmarks/loo.py --quick        # fewer points and steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import influence, verify_leave_one_out
from lightning_influence.analysis.diagnostics import correlations

PUBLISHED = {
    "lr": "Koh & Liang 2017 (MNIST logistic regression): Pearson ~0.99",
    "cnn": "Koh & Liang 2017 (CNN): Pearson ~0.86; Basu et al. 2021 (small CNN, weight decay): Pearson 0.95 / Spearman 0.87",
}


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.head(x.flatten(1))


class Logistic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def per_example_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    return F.cross_entropy(model(x), y) + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float, adam_epochs: int) -> nn.Module:
    """Full-batch Adam (non-convex warm-up) then L-BFGS to a near-stationary point."""
    if adam_epochs:
        adam = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(adam_epochs):
            adam.zero_grad()
            objective(model, x, y, l2).backward()
            adam.step()
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe",
                              tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = objective(model, x, y, l2)
        loss.backward()
        return loss

    lbfgs.step(closure)
    return model


def run(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    train_idx, test_idx = order[: args.train], order[args.train :]
    xt, yt = x[train_idx], y[train_idx]
    torch.manual_seed(args.seed)
    l2 = 1e-2
    model = (Logistic() if name == "lr" else SmallCNN()).double()
    start, start_cpu = time.perf_counter(), time.process_time()
    train(model, xt, yt, l2, adam_epochs=0 if name == "lr" else 200)
    with torch.no_grad():
        test_losses = per_example_loss(model, (x[test_idx], y[test_idx]))
        accuracy = float((model(x[test_idx]).argmax(1) == y[test_idx]).double().mean())
    worst = int(test_losses.argmax())
    test_example = (x[test_idx][worst : worst + 1], y[test_idx][worst : worst + 1])
    print(f"{name}: trained in {time.process_time() - start_cpu:.1f}s CPU ({time.perf_counter() - start:.1f}s wall),"
          f" test accuracy {accuracy:.3f},"
          f" test point loss {float(test_losses[worst]):.3f}", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    reference = "exact" if name == "lr" else "cg"
    options = {} if reference == "exact" else {"tol": 1e-8, "max_iter": 500}
    train_set = TensorDataset(xt, yt)
    check = verify_leave_one_out(model, per_example_loss, train_set, test_example, num_points=args.points,
                                 steps=args.steps, damping=l2, solver=reference, **options)
    rows = [_row(name, reference, check.pearson, check.spearman, check, wall, cpu, accuracy, check.predicted)]
    # the same removed examples and retraining runs, predicted by LiSSA instead
    wall, cpu = time.perf_counter(), time.process_time()
    lissa = influence(model, per_example_loss, DataLoader(train_set, batch_size=256), test_example, solver="lissa",
                      damping=l2, depth=args.depth, repeats=args.repeats, batch_size=128)[0]
    predicted = -lissa[list(check.train_indices)].double() / len(train_set)
    pearson, spearman = correlations(predicted, check.actual)
    rows.append(_row(name, "lissa", pearson, spearman, check, wall, cpu, accuracy, predicted))
    for row in rows:
        print(f"  {row['solver']:5s} Pearson {row['pearson']:.3f}  Spearman {row['spearman']:.3f}  "
              f"({row['cpu_s']:.1f}s CPU, {row['wall_s']:.1f}s wall)", flush=True)
    return rows


def _row(name: str, solver: str, pearson: Any, spearman: Any, check: Any, wall: float, cpu: float,
         accuracy: float, predicted: torch.Tensor) -> dict[str, Any]:
    return {
        "model": name, "solver": solver, "points": len(check.train_indices), "steps": check.steps,
        "pearson": pearson, "spearman": spearman, "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu, "test_accuracy": accuracy,
        "max_abs_actual": float(check.actual.abs().max()), "max_abs_predicted": float(predicted.abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="retraining steps (each up to 10 L-BFGS iterations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=1000, help="LiSSA depth")
    parser.add_argument("--repeats", type=int, default=2, help="LiSSA repeats")
    parser.add_argument("--models", default="lr,cnn")
    parser.add_argument("--quick", action="store_true", help="5 points, 10 steps")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.quick:
        args.points, args.steps, args.depth = 5, 3, 300
    torch.set_num_threads(1)
    rows = [row for name in args.models.split(",") for row in run(name, args)]
    print("\n| model | solver | removed | steps | Pearson | Spearman | CPU s | published |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['solver']} | {row['points']} | {row['steps']} | {row['pearson']:.3f} |"
              f" {row['spearman']:.3f} | {row['cpu_s']:.1f} | {PUBLISHED[row['model']]} |")
    print(f"\nwhole script: {time.process_time():.1f}s CPU")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
