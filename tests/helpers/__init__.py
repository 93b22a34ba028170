"""Shared small models and data for the tests: scikit-learn digits, logistic regression, a small CNN."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.core.tensors.data import IndexedData


@functools.lru_cache(maxsize=None)
def digits(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images ``[N, 1, 8, 8]`` scaled to [0, 1] and integer labels."""
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=dtype).reshape(-1, 1, 8, 8), torch.tensor(labels)


def flipped_digits(n: int, flips: int) -> tuple[torch.Tensor, torch.Tensor, nn.Module, IndexedData]:
    """The first ``n`` digits (float64) with the first ``flips`` labels moved by +3 (mod 10), an untrained seeded
    logistic regression and the data as :class:`IndexedData` in batches of 50: the planted-flip mislabel setup."""
    x, y = digits(torch.float64)
    x, y = x[:n], y[:n].clone()
    y[:flips] = (y[:flips] + 3) % 10
    torch.manual_seed(0)
    model = LogisticRegression().double()
    return x, y, model, IndexedData(torch.utils.data.TensorDataset(x, y), None, 50)


def train_recording_signals(model: nn.Module, data: IndexedData, epochs: int = 3):
    """Full-batch SGD (lr 0.5, 5 steps an epoch) on ``data``'s tensors, recording training signals after each
    epoch; returns the recorder."""
    from lightning_influence.analysis.training_signals import TrainingSignalRecorder

    x, y = data.dataset.tensors
    recorder = TrainingSignalRecorder(len(x), epochs=list(range(epochs)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(epochs):
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        recorder.record(model, data, epoch)
    return recorder


def cross_entropy_per_example(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets, reduction="none")


class LogisticRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class SmallCNN(nn.Module):
    """About 2.5k parameters, smooth activations (so the Hessian is well defined everywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.head(x.flatten(1))


def l2_objective(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, l2: float,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``1/n sum_i w_i L(z_i) + l2/2 ||theta||^2`` with n the full training-set size."""
    losses = F.cross_entropy(model(inputs), targets, reduction="none")
    data = losses.mean() if weights is None else (weights * losses).sum() / len(losses)
    return data + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())


def _flat_objective(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, l2: float,
                    weights: torch.Tensor | None):
    params = dict(model.named_parameters())

    def objective(flat: torch.Tensor) -> torch.Tensor:
        chunks, offset = {}, 0
        for name, p in params.items():
            chunks[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        out = torch.func.functional_call(model, chunks, (inputs,))
        losses = F.cross_entropy(out, targets, reduction="none")
        data = losses.mean() if weights is None else (weights * losses).sum() / len(losses)
        return data + 0.5 * l2 * (flat**2).sum()

    return objective, torch.cat([p.detach().reshape(-1) for p in params.values()])


def _load_flat(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def fit_newton(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, l2: float,
               weights: torch.Tensor | None = None, steps: int = 30,
               fixed_hessian: torch.Tensor | None = None) -> nn.Module:
    """Minimise the convex L2-regularised objective of a small model by Newton's method, in place.

    With ``fixed_hessian`` (the Hessian at a nearby optimum, e.g. before removing one example) every step
    reuses it: a warm-started leave-one-out refit then converges in a few gradient evaluations.
    """
    objective, flat = _flat_objective(model, inputs, targets, l2, weights)
    for _ in range(steps):
        gradient = torch.func.grad(objective)(flat)
        if gradient.norm() < 1e-13:
            break
        matrix = fixed_hessian if fixed_hessian is not None else torch.func.hessian(objective)(flat)
        flat = flat - torch.linalg.solve(matrix, gradient)
    return _load_flat(model, flat)


def objective_hessian(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, l2: float) -> torch.Tensor:
    objective, flat = _flat_objective(model, inputs, targets, l2, None)
    return torch.func.hessian(objective)(flat)


def fit_adam(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, l2: float, epochs: int = 60,
             lr: float = 0.01, seed: int = 0) -> nn.Module:
    """Full-batch Adam then L-BFGS on the L2-regularised objective (a near-stationary non-convex fit)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        l2_objective(model, inputs, targets, l2).backward()
        optimizer.step()
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe",
                              tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = l2_objective(model, inputs, targets, l2)
        loss.backward()
        return loss

    lbfgs.step(closure)
    return model


def loader(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> DataLoader:
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)
