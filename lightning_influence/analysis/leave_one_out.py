"""Leave-one-out spot checks: does removing a training example change the test loss as influence predicts?

Protocol (Koh & Liang 2017, Sec. 5.1; Basu et al. 2021): from the analysed parameters ``theta``, retrain for a
fixed number of full-batch steps once with every training example (the baseline) and once without each of m
chosen examples, with the same optimiser, steps and order. The actual change is
``L_test(theta_-z) - L_test(theta_base)``; influence predicts ``-I(z, z_test) / n`` (the package convention:
removing z is up-weighting it by ``-1/n``). Warm-starting both runs from ``theta`` makes the difference isolate
the removal rather than the optimiser's drift.

Pure torch: the retraining optimises a copy of the trainable parameters through ``torch.func.functional_call``,
so the module itself (and its ``.grad``) is never touched; it runs in ``eval()`` mode (no dropout, BatchNorm
running statistics), the function the influence analysis explains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence.config import DEFAULT_DAMPING, Damping
from lightning_influence.core.per_example.losses import FunctionalLoss, LossFn
from lightning_influence.core.tensors.batching import Batch, batch_size_of, prepare_batch
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.core.tensors.params import Params, model_device, trainable_parameters
from lightning_influence.functional import influence
from lightning_influence.results import LeaveOneOutCheck

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def default_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Full-batch L-BFGS, up to 10 iterations per step with a strong-Wolfe line search: close to the exact refit
    for small convex models within a few steps."""
    return torch.optim.LBFGS(params, lr=1.0, max_iter=10, history_size=50, line_search_fn="strong_wolfe",
                             tolerance_grad=1e-10, tolerance_change=1e-14)


def retrain(
    loss: FunctionalLoss,
    start: Params,
    batches: Sequence[tuple[torch.Tensor, Batch]],
    train_size: int,
    removed: Optional[int],
    optimizer: OptimizerFactory,
    steps: int,
    l2: float,
) -> Params:
    """``steps`` full-batch optimiser steps on ``1/n sum_{i != removed} L(z_i) + l2/2 ||theta||^2`` from ``start``."""
    params = {name: value.detach().clone().requires_grad_(True) for name, value in start.items()}
    opt = optimizer(list(params.values()))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), dtype=next(iter(params.values())).dtype)
        for indices, batch in batches:
            losses = loss(params, batch)
            if removed is not None:
                losses = losses * (indices != removed).to(losses)
            objective = losses.sum() / train_size
            objective.backward()
            total = total + objective.detach()
        if l2:
            penalty = 0.5 * l2 * torch.stack([(p**2).sum() for p in params.values()]).sum()
            penalty.backward()
            total = total + penalty.detach()
        return total

    for _ in range(steps):
        opt.step(closure)  # type: ignore[arg-type]  # torch's stub says float; a loss tensor is what it expects
    return {name: value.detach() for name, value in params.items()}


def verify_leave_one_out(  # long: a 30-line docstring of the protocol; the body is ~35 lines
    model: nn.Module,
    loss_fn: LossFn,
    train: Union[Dataset, DataLoader],
    test_example: Batch,
    *,
    num_points: int = 10,
    train_indices: Optional[Sequence[int]] = None,
    influences: Optional[Sequence[float]] = None,
    steps: int = 50,
    optimizer: Optional[OptimizerFactory] = None,
    l2: Optional[float] = None,
    batch_size: int = 512,
    solver: str = "exact",
    damping: Damping = DEFAULT_DAMPING,
    **solver_options: Any,
) -> LeaveOneOutCheck:
    """Retrain without each of ``num_points`` training examples and compare with influence's prediction.

    Args:
        model: the analysed module (left unchanged).
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses (no L2 term).
        train: the training dataset (or a DataLoader whose dataset and collate function are used).
        test_example: a batch holding exactly one test example.
        num_points: how many examples to remove, the largest ``|I(z, z_test)|`` first.
        train_indices: remove these examples instead (with ``influences``: skip the influence solve).
        influences: ``I(z, z_test)`` of ``train_indices``, computed elsewhere (e.g. an InfluenceCallback report).
        steps: optimiser steps of every retraining run (baseline and each removal).
        optimizer: ``params -> torch.optim.Optimizer`` (default :func:`default_optimizer`, full-batch L-BFGS).
        l2: L2 strength of the retraining objective. Default ``damping`` (0 with ``damping="auto"``): then the
            Hessian of the retrained
            objective is the damped ``H + damping I`` of the prediction. Pass 0 when ``optimizer`` applies the
            training weight decay itself.
        batch_size: examples per forward pass when evaluating the full-batch objective.
        solver, damping, **solver_options: how to compute the influence (see :func:`lightning_influence.influence`).

    Returns:
        A :class:`LeaveOneOutCheck`.
    """
    data = IndexedData.from_loader(train, batch_size) if isinstance(train, DataLoader) else IndexedData(train, None,
                                                                                                        batch_size)
    n = len(data)
    if batch_size_of(test_example) != 1:
        raise ValueError(f"Expected `test_example` to hold exactly one example, but it holds"
                         f" {batch_size_of(test_example)}. Slice one example (e.g. `(x[i:i+1], y[i:i+1])`).")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected `steps` to be a positive int, but got {steps!r}.")
    chosen, scores = _chosen_points(model, loss_fn, data, test_example, num_points, train_indices, influences, solver,
                                    damping, solver_options)
    loss = FunctionalLoss(model, loss_fn)
    device = model_device(model)
    start_time = time.perf_counter()
    with analysis_mode(model):
        start = trainable_parameters(model)
        batches = [(indices.to(device), prepare_batch(batch, device)) for indices, batch in data.batches_with_indices()]
        test = prepare_batch(test_example, device)
        factory = optimizer or default_optimizer
        strength = l2 if l2 is not None else (float(damping) if damping != "auto" else 0.0)

        def test_loss(params: Params) -> float:
            with torch.no_grad():
                return float(loss(params, test)[0])

        base = test_loss(retrain(loss, start, batches, n, None, factory, steps, strength))
        actual = torch.tensor([test_loss(retrain(loss, start, batches, n, i, factory, steps, strength)) - base
                               for i in chosen], dtype=torch.float64)
    predicted = -scores / n
    from lightning_influence.analysis.diagnostics import correlations

    pearson, spearman = correlations(predicted, actual)
    return LeaveOneOutCheck(tuple(chosen), scores, predicted, actual, pearson, spearman, base, n, steps,
                            time.perf_counter() - start_time)


def _chosen_points(
    model: nn.Module, loss_fn: LossFn, data: IndexedData, test_example: Batch, num_points: int,
    train_indices: Optional[Sequence[int]], influences: Optional[Sequence[float]], solver: str, damping: Damping,
    solver_options: dict[str, Any],
) -> tuple[list[int], torch.Tensor]:
    """The examples to remove and their influence: given, or the top ``num_points`` by ``|I|``."""
    n = len(data)
    if train_indices is not None:
        chosen = [int(i) for i in train_indices]
        bad = [i for i in chosen if not 0 <= i < n]
        if bad or len(set(chosen)) != len(chosen) or not chosen:
            raise ValueError(f"Expected `train_indices` to be distinct training indices in [0, {n}), but got"
                             f" {list(train_indices)}.")
        if influences is not None:
            if len(influences) != len(chosen):
                raise ValueError(f"Expected one influence per train index ({len(chosen)}), but got {len(influences)}.")
            return chosen, torch.tensor([float(v) for v in influences], dtype=torch.float64)
    elif not isinstance(num_points, int) or not 1 <= num_points <= n:
        raise ValueError(f"Expected `num_points` to be an int in [1, {n}] (the training-set size), but got"
                         f" {num_points!r}.")
    scores = influence(model, loss_fn, data.loader(), test_example, solver=solver, damping=damping,
                       **solver_options)[0].double()
    if train_indices is None:
        chosen = scores.abs().topk(num_points).indices.tolist()
    return chosen, scores[chosen]


