"""The four tasks of ``benchmarks/error_correction.py``: a weak slice, a model that gets it wrong, and the data.

Every task has a training set carrying a systematic error, and a validation set split four ways: the slice's
**anchors** (given to the correction), its **held-out** part (measured), the **guard** (validation examples
outside the slice, given to the correction as the examples to protect, never measured) and the **others**
(validation outside the slice, measured: the cost of a fix). "overall" = held-out + others.

- ``digits-linear``: scikit-learn digits, 60% of the training 8s labelled 1; logistic regression trained to
  convergence (full-batch Adam then L-BFGS, L2 1e-3).
- ``digits-mlp``: the same data; an MLP 64-32-10 (ReLU) trained by mini-batch Adam for a few epochs, no weight
  decay (not converged).
- ``digits-cnn``: the same data; a small ReLU CNN trained by mini-batch Adam for a few epochs, no weight decay.
- ``text-spurious``: generated token sequences labelled 1 iff they contain a keyword (as in
  ``examples/text_classification.py``), plus a spurious token that occurs in most positive and few negative
  *training* sequences; in validation it is independent of the label, so negatives carrying it (the slice) are
  called positive. Model: mean of token embeddings, a tanh hidden layer, trained by mini-batch Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

TASKS = ("digits-linear", "digits-mlp", "digits-cnn", "text-spurious")
N_TRAIN = 1000
SLICE_CLASS, CONFUSED_WITH, FLIP_FRACTION = 8, 1, 0.6
WEIGHT_DECAY = 1e-3  # the logistic regression's L2
VOCAB, LENGTH, PAD, KEYWORDS, SPURIOUS = 64, 16, 0, (2, 3, 4, 5), 6
N_TEXT_TRAIN, N_TEXT_VAL = 1000, 800
SPURIOUS_IN_POSITIVE, SPURIOUS_IN_NEGATIVE = 0.9, 0.03  # training only; validation: 0.5 for both


class TaskModel(nn.Module):
    """The four models; ``per_example_loss(batch)`` is cross-entropy per example."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "digits-linear":
            self.net: nn.Module = nn.Linear(64, 10)
        elif kind == "digits-mlp":
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        elif kind == "digits-cnn":
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                                     nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        else:
            self.embedding = nn.Embedding(VOCAB, 16)
            self.net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("digits-linear", "digits-mlp"):
            return self.net(x.flatten(1))
        if self.kind == "digits-cnn":
            return self.net(x)
        mask = (x != PAD).to(self.embedding.weight.dtype)
        pooled = (self.embedding(x) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.net(pooled)

    def per_example_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


@dataclass(frozen=True)
class Task:
    name: str
    train: TensorDataset
    anchors: TensorDataset
    heldout: TensorDataset  # the slice's held-out part (measured)
    guard: TensorDataset  # validation outside the slice given to the correction (not measured)
    others: TensorDataset  # validation outside the slice, measured
    overall: TensorDataset  # heldout + others
    slice_label: int  # the slice's true label
    confused_label: int  # what the model calls it


def _split(x: torch.Tensor, y: torch.Tensor, in_slice: torch.Tensor, generator: torch.Generator
           ) -> tuple[TensorDataset, TensorDataset, TensorDataset, TensorDataset, TensorDataset]:
    """Validation -> anchors, held-out slice, guard, others, overall (halves, seeded)."""
    inside = in_slice.nonzero().flatten()
    outside = (~in_slice).nonzero().flatten()
    inside = inside[torch.randperm(len(inside), generator=generator)]
    outside = outside[torch.randperm(len(outside), generator=generator)]
    anchors, heldout = inside[: len(inside) // 2], inside[len(inside) // 2 :]
    guard, others = outside[: len(outside) // 2], outside[len(outside) // 2 :]

    def part(index: torch.Tensor) -> TensorDataset:
        return TensorDataset(x[index], y[index])

    return part(anchors), part(heldout), part(guard), part(others), part(torch.cat([heldout, others]))


def make_task(name: str, seed: int) -> Task:
    generator = torch.Generator().manual_seed(seed)
    if name == "text-spurious":
        x_train, y_train = _sequences(N_TEXT_TRAIN, generator, SPURIOUS_IN_POSITIVE, SPURIOUS_IN_NEGATIVE)
        x_val, y_val = _sequences(N_TEXT_VAL, generator, 0.5, 0.5)
        in_slice = (y_val == 0) & (x_val == SPURIOUS).any(1)
        return Task(name, TensorDataset(x_train, y_train), *_split(x_val, y_val, in_slice, generator), 0, 1)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=generator)
    train, val = order[:N_TRAIN], order[N_TRAIN:]
    y_train = y[train].clone()
    slice_train = (y_train == SLICE_CLASS).nonzero().flatten()
    flips = slice_train[torch.randperm(len(slice_train), generator=generator)[: round(FLIP_FRACTION * len(slice_train))]]
    y_train[flips] = CONFUSED_WITH
    return Task(name, TensorDataset(x[train], y_train), *_split(x[val], y[val], y[val] == SLICE_CLASS, generator),
                SLICE_CLASS, CONFUSED_WITH)


def _sequences(n: int, generator: torch.Generator, spurious_positive: float, spurious_negative: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of 6-16 tokens (label 1 iff a keyword occurs); the spurious token is put into a positive
    with probability ``spurious_positive`` and into a negative with ``spurious_negative``."""
    lengths = torch.randint(6, LENGTH + 1, (n,), generator=generator)
    ids = torch.randint(SPURIOUS + 1, VOCAB, (n, LENGTH), generator=generator)
    labels = torch.rand(n, generator=generator) < 0.5
    for i in range(n):
        length = int(lengths[i])
        positions = torch.randperm(length, generator=generator).tolist()
        if labels[i]:
            for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
                ids[i, positions.pop()] = KEYWORDS[int(torch.randint(0, len(KEYWORDS), (1,), generator=generator))]
        share = spurious_positive if labels[i] else spurious_negative
        if float(torch.rand(1, generator=generator)) < share:
            ids[i, positions.pop()] = SPURIOUS
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, PAD), labels.long()


def train_model(task: Task, seed: int) -> TaskModel:
    """Logistic regression to convergence; the others a few epochs of mini-batch Adam (not converged)."""
    torch.manual_seed(seed)
    model = TaskModel(task.name).double()
    x, y = task.train.tensors
    if task.name == "digits-linear":
        def objective() -> torch.Tensor:
            return model.per_example_loss((x, y)).mean() + 0.5 * WEIGHT_DECAY * sum((p**2).sum() for p in model.parameters())

        adam = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(300):
            adam.zero_grad()
            objective().backward()
            adam.step()
        lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-7)

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        lbfgs.step(closure)
        return model
    epochs = {"digits-mlp": 20, "digits-cnn": 15, "text-spurious": 30}[task.name]
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(32):
            adam.zero_grad()
            model.per_example_loss((x[batch], y[batch])).mean().backward()
            adam.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).double().mean())
