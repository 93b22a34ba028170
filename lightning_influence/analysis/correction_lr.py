"""The learning rate of an error-correction run when none is given (``lr="auto"``): a line search on the anchors.

A model's sensible step size depends on its scale (a logistic regression, an MLP, a CNN and a text model want
steps orders of magnitude apart), so a fixed default lr either does nothing or breaks something. Before the first
round, one step of the run's own (fresh) optimizer is tried on the anchors' mean loss at each learning rate of a
descending grid, from the same weights each time; the first (largest) lr whose step satisfies Armijo's
sufficient-decrease condition

    L_A(w + d) <= L_A(w) + c * grad L_A(w) . d        (d: the step the optimizer took, c = ``ARMIJO_C``)

is chosen: the largest step along which the anchors' loss still falls at least half as fast as its slope
promises, i.e. one the local linear model still describes. For SGD that is about the inverse of the curvature
along the anchors' gradient; for Adam, whose first step is about ``lr * sign(gradient)``, the analogue. Every
selection of the run then uses that lr, so they share one budget. The search runs in eval mode (BatchNorm on its
running statistics) and puts every parameter and buffer back; it uses no randomness, so every rank of a DDP run
finds the same lr.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from lightning_influence.core.per_example.losses import LossFn, check_per_example_losses
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.modes import analysis_mode

#: Learning rates tried, largest first: 10 down to 1e-6 in steps of sqrt(10).
LR_GRID = tuple(float(10.0 ** (e / 2)) for e in range(2, -13, -1))
#: Armijo's constant: the step must realise at least this share of the decrease its slope predicts.
ARMIJO_C = 0.5


def make_fresh_optimizer(name: str, params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"Expected `optimizer` to be 'sgd' or 'adam' with lr='auto', but got {name!r}.")


def search_lr(model: nn.Module, loss_fn: LossFn, batch: Batch, size: int, optimizer: str,
              grid: Sequence[float] = LR_GRID) -> tuple[float, list[tuple[float, float]]]:
    """The largest lr of ``grid`` whose single ``optimizer`` step on the mean loss of ``batch`` (``size`` examples)
    passes Armijo's condition, and every trial as ``(lr, loss after its step)``; the model is left as it was.

    Raises ``ValueError`` when no lr of the grid lowers the loss enough (e.g. the anchors' loss is already ~0).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    state = copy.deepcopy(model.state_dict())
    saved_grads: list[Optional[torch.Tensor]] = [p.grad for p in params]
    trials: list[tuple[float, float]] = []
    try:
        with analysis_mode(model):
            loss0_tensor = check_per_example_losses(loss_fn(model, batch), size).mean()
            grads = torch.autograd.grad(loss0_tensor, params, allow_unused=True)
            loss0 = float(loss0_tensor.detach())
            grads = tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads))
            start = [p.detach().clone() for p in params]
            for lr in grid:
                step = make_fresh_optimizer(optimizer, params, lr)
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                step.step()
                with torch.no_grad():
                    slope = sum(float((g * (p - p0)).sum()) for g, p, p0 in zip(grads, params, start))
                    loss = float(check_per_example_losses(loss_fn(model, batch), size).mean())
                    for p, p0 in zip(params, start):
                        p.copy_(p0)
                trials.append((lr, loss))
                if loss == loss and slope < 0 and loss <= loss0 + ARMIJO_C * slope:
                    return lr, trials
    finally:
        model.load_state_dict(state)
        for p, saved in zip(params, saved_grads):
            p.grad = saved
    raise ValueError(
        f"Expected the anchors' loss to fall under one {optimizer} step of some lr in {grid[0]:g}..{grid[-1]:g}, but"
        f" it did not (loss {loss0:.4g}; after each step: {[round(v, 4) for _, v in trials]}). The model may"
        " already fit the anchors: check that they are examples it gets wrong, or pass a number as `lr`."
    )
