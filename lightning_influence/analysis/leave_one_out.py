"""Leave-one-out spot checks: does removing a training example change the test loss as influence predicts?

Protocol (Koh & Liang 2017, Sec. 5.1; Basu et al. 2021): from the analysed parameters ``theta``, retrain for a
fixed number of full-batch steps once with every training example (the baseline) and once without each of m
chosen examples, with the same optimiser, steps and order, on the training loss plus an L2 term of strength
``l2`` (default: the damping, so the retrained Hessian is the damped curvature of the prediction): up to the
training's weight decay it pulls towards 0 as training did, the rest towards the analysed weights (proximal).
The actual change is ``L_test(theta_-z) - L_test(theta_base)``; influence predicts ``-I(z, z_test) / n`` (the package convention:
removing z is up-weighting it by ``-1/n``). Warm-starting both runs from ``theta`` makes the difference isolate
the removal rather than the optimiser's drift.

Pure torch: the retraining optimises a float64 copy of the trainable parameters through
``torch.func.functional_call``, so the module itself (and its ``.grad``) is never touched; it runs in ``eval()``
mode (no dropout, BatchNorm running statistics), the function the influence analysis explains. Float64 because
one removal out of n moves the test loss by about 1/n of an influence: float32 rounding in a full-batch line
search is of that order. The baseline's test loss is followed step by step: how much its last step still moved
it is the check's resolution, reported beside the changes it has to resolve.
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
from lightning_influence.functional import influence, make_problem
from lightning_influence.results import LeaveOneOutCheck

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

#: A retraining run stops early once two steps in a row moved the test loss by less than this share of the median
#: predicted change: far below what the check has to resolve (the report's threshold is 10 times larger).
SETTLED_SHARE = 0.01


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
    after_step: Optional[Callable[[Params], bool]] = None,
    decay: Optional[float] = None,
) -> Params:
    """``steps`` full-batch optimiser steps from ``start`` on
    ``1/n sum_{i != removed} L(z_i) + decay/2 ||theta||^2 + (l2 - decay)/2 ||theta - start||^2``;
    ``after_step(params)`` is called after each; when it returns True the run stops there.

    Both terms add to the Hessian ``l2 I``, the damping of the prediction. ``decay`` (default: all of ``l2``) is
    the training's own L2, towards 0 as in training; the rest is proximal, centred at the analysed parameters,
    so it keeps every run near the model that was analysed. An L2 towards 0 as strong as a typical damping
    pulls a net's weights far from it (towards the constant predictor): the runs would measure another model.
    """
    decay = l2 if decay is None else min(decay, l2)
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
            penalty = 0.5 * torch.stack([decay * (p**2).sum() + (l2 - decay) * ((p - start[name]) ** 2).sum()
                                         for name, p in params.items()]).sum()
            penalty.backward()
            total = total + penalty.detach()
        return total

    for _ in range(steps):
        opt.step(closure)  # type: ignore[arg-type]  # torch's stub says float; a loss tensor is what it expects
        if after_step is not None and after_step(params):
            break
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
    on_step: Optional[Callable[[int], None]] = None,
    weight_decay: Optional[float] = None,
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
        l2: L2 strength of the retraining objective. Default: the damping the influence is solved with
            (``"auto"`` resolved to its number), so the Hessian of the retrained objective is the damped
            ``H + damping I`` of the prediction. Pass 0 when ``optimizer`` applies the training weight decay itself.
        batch_size: examples per forward pass when evaluating the full-batch objective.
        solver, damping, **solver_options: how to compute the influence (see :func:`lightning_influence.influence`).
        on_step: called with 1 after every retraining step (``(len(removed) + 1) * steps`` in all), for progress.
        weight_decay: the training's L2 strength, when known (it also floors ``damping="auto"``). Up to it the
            retraining L2 pulls towards 0 as training did; the rest of ``l2`` is proximal, towards the analysed
            weights. None: all of ``l2`` pulls towards 0 (the classic leave-one-out refit of a model trained
            with that L2).

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
    if weight_decay is not None:
        solver_options = {**solver_options, "weight_decay": weight_decay}
    chosen, scores, used = _chosen_points(model, loss_fn, data, test_example, num_points, train_indices, influences,
                                          solver, damping, solver_options)
    loss = FunctionalLoss(model, loss_fn, torch.float64)
    device = model_device(model)
    start_time = time.perf_counter()
    tick = on_step or (lambda n: None)
    strength = float(l2) if l2 is not None else (used or 0.0)
    with analysis_mode(model):
        start = {name: value.detach().double() for name, value in trainable_parameters(model).items()}
        batches = [(indices.to(device), prepare_batch(batch, device)) for indices, batch in data.batches_with_indices()]
        test = prepare_batch(test_example, device)
        factory = optimizer or default_optimizer

        def test_loss(params: Params) -> float:
            with torch.no_grad():
                return float(loss(params, test)[0])

        predicted = -scores / n
        # early stop only for the default L-BFGS, which converges: a slow optimiser's small steps are not a settled loss
        settle = SETTLED_SHARE * float(predicted.abs().median()) if optimizer is None else 0.0
        first = test_loss(start)
        traces: list[list[float]] = []

        def run(removed: Optional[int]) -> float:
            """One retraining; it stops once two steps in a row moved the test loss by less than ``settle``."""
            trace = [first]

            def follow(params: Params) -> bool:
                trace.append(test_loss(params))
                tick(1)
                settled = len(trace) > 2 and max(abs(trace[-1] - trace[-2]), abs(trace[-2] - trace[-3])) < settle
                if settled:
                    tick(steps + 1 - len(trace))  # the steps it skips
                return settled

            retrain(loss, start, batches, n, removed, factory, steps, strength, follow, weight_decay)
            traces.append(trace)
            return trace[-1]

        base = run(None)
        actual = torch.tensor([run(i) - base for i in chosen], dtype=torch.float64)
    trace = traces[0]
    from lightning_influence.analysis.diagnostics import correlations

    pearson, spearman = correlations(predicted, actual)
    return LeaveOneOutCheck(tuple(chosen), scores, predicted, actual, pearson, spearman, base, n, steps,
                            time.perf_counter() - start_time, damping=used, l2=strength,
                            l2_towards_zero=strength if weight_decay is None else min(weight_decay, strength),
                            start_test_loss=trace[0], steps_run=tuple(len(t) - 1 for t in traces),
                            last_step_change=abs(trace[-1] - trace[-2]), slope=_slope(predicted, actual),
                            sign_agreement=float((predicted.sign() == actual.sign()).double().mean()))


def _slope(predicted: torch.Tensor, actual: torch.Tensor) -> Optional[float]:
    """Least-squares ``actual ~= slope * predicted`` through the origin (None when every prediction is 0)."""
    norm = float((predicted * predicted).sum())
    return float((predicted * actual).sum()) / norm if norm > 0 else None


def _chosen_points(
    model: nn.Module, loss_fn: LossFn, data: IndexedData, test_example: Batch, num_points: int,
    train_indices: Optional[Sequence[int]], influences: Optional[Sequence[float]], solver: str, damping: Damping,
    solver_options: dict[str, Any],
) -> tuple[list[int], torch.Tensor, Optional[float]]:
    """The examples to remove, their influence (given, or the top ``num_points`` by ``|I|``) and the damping
    it was solved with (``"auto"`` resolved; None when the influences were given)."""
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
            return chosen, torch.tensor([float(v) for v in influences], dtype=torch.float64), None
    elif not isinstance(num_points, int) or not 1 <= num_points <= n:
        raise ValueError(f"Expected `num_points` to be an int in [1, {n}] (the training-set size), but got"
                         f" {num_points!r}.")
    if damping == "auto":  # resolve it once: the number is reported and is the retraining's default L2
        with analysis_mode(model):
            damping = make_problem(model, loss_fn, data.loader(), solver, damping, dict(solver_options)).damping
    scores = influence(model, loss_fn, data.loader(), test_example, solver=solver, damping=damping,
                       **solver_options)[0].double()
    if train_indices is None:
        chosen = scores.abs().topk(num_points).indices.tolist()
    return chosen, scores[chosen], float(damping)


