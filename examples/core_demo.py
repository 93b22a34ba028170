"""The core API without Lightning: which digits training images most raise or lower a test loss.

Run: ``python examples/core_demo.py`` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li

WEIGHT_DECAY = 1e-3


def per_example_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets, reduction="none")


def main() -> None:
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    train = DataLoader(TensorDataset(x[:1200], y[:1200]), batch_size=256)
    x_test, y_test = x[1200:], y[1200:]

    model = nn.Linear(64, 10)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[:1200]), y[:1200]) + 0.5 * WEIGHT_DECAY * sum(
            (p**2).sum() for p in model.parameters()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        test_losses = per_example_loss(model, (x_test, y_test))
        accuracy = (model(x_test).argmax(1) == y_test).float().mean()
    print(f"logistic regression on digits: test accuracy {accuracy:.3f}")

    worst = test_losses.topk(3).indices
    test_batch = (x_test[worst], y_test[worst])
    for solver in ("lissa", "exact"):
        start = time.perf_counter()
        scores = li.influence(model, per_example_loss, train, test_batch, solver=solver, damping=WEIGHT_DECAY)
        print(f"\n{solver}: {time.perf_counter() - start:.1f} s   (positive influence = harmful)")
        for row, index in enumerate(worst.tolist()):
            harmful = scores[row].topk(3).indices.tolist()
            helpful = scores[row].topk(3, largest=False).indices.tolist()
            print(
                f"  test #{1200 + index} (label {int(y_test[index])}, loss {float(test_losses[index]):.2f}):"
                f" most harmful train {harmful} (labels {y[harmful].tolist()}),"
                f" most helpful {helpful} (labels {y[helpful].tolist()})"
            )


if __name__ == "__main__":
    main()
