"""The damping chosen by retraining: which candidate damping's influence best predicts a few short retrainings?

``damping="self_check"`` (the callback's default). The question influence answers is "how would the test loss
change if these training examples were left out?", so the check asks it of the model itself:

1. ``K`` retrainings, each on a random half ``S_k`` of the training set, warm-started from the analysed weights
   with the training's own optimiser for half the epochs trained so far; the test losses ``L_k(t)`` of a few
   check points ``t`` after each (:func:`retrain_on_halves`).
2. For each candidate damping ``d``: the influences ``I_d(z, t)`` and the linear datamodeling score (LDS, Park et
   al. 2023): the Spearman correlation over ``k`` of ``sum_{z in S_k} I_d(z, t)`` with ``L_k(t)``, averaged over
   the check points (:func:`datamodeling_score`).
3. The damping with the best LDS wins (:func:`check_damping`); candidates whose solve did not converge are out.

Measured in ``benchmarks/lds.py`` on seven models against 50 full half-subset retrainings each (see
docs/retraining.md): the choice lands near the best fixed damping in hindsight on every model, where every
rule read from the curvature's spectrum alone misses by 0.05-0.18 on some model. It costs about
``K / 4`` trainings of the run so far (``K`` runs of half the epochs on half the data).

Lightning-free: the caller provides the optimiser (the callback reads it from the trainer).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.config import CGConfig, ExplainConfig, ProblemConfig
from lightning_influence.config.defaults import (
    DEFAULT_DAMPING,
    SELF_CHECK_CANDIDATES,
    SELF_CHECK_MIN_ITERATIONS,
    SELF_CHECK_POINTS,
    SELF_CHECK_RETRAININGS,
    SELF_CHECK_SEED,
    SELF_CHECK_SOLVE_BUDGET,
    SELF_CHECK_SOLVE_FLOOR_SECONDS,
)
from lightning_influence.core.curvature.jacobian import RowBatch
from lightning_influence.core.per_example.losses import LossFn, call_loss_fn
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers.exact import ExactInverse
from lightning_influence.core.tensors.batching import Batch, batch_size_of, prepare_batch
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.core.tensors.params import model_device
from lightning_influence.distributed.collectives import SingleProcess
from lightning_influence.distributed.scoring import score_training_set
from lightning_influence.distributed.solve import solve_s_test
from lightning_influence.results import DampingCheck

#: Models up to this many analysed parameters get the candidates' exact solves from one eigendecomposition of the
#: dense curvature (a 5k x 5k float64 matrix is 200 MB); larger ones preconditioned conjugate gradient per candidate.
EXACT_CHECK_PARAMETERS = 5_000
#: ``params -> optimizer``: a fresh optimiser of the training's kind over the given parameters.
OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Retrainings:
    """Short retrainings on random halves of the training set.

    Attributes:
        masks: ``[K, n]`` 1 where training example j was kept by retraining k.
        losses: ``[K, m]`` the check points' losses after each retraining.
        epochs: epochs of each retraining.
        seconds: wall time of all of them.
    """

    masks: torch.Tensor
    losses: torch.Tensor
    epochs: int
    seconds: float


def _closure(opt: torch.optim.Optimizer, loss_fn: LossFn, model: nn.Module, batch: Batch) -> torch.Tensor:
    """The mean loss of ``batch``, its gradients in ``.grad``: what ``optimizer.step(closure)`` evaluates."""
    opt.zero_grad(set_to_none=True)
    loss = call_loss_fn(loss_fn, model, batch).float().mean()
    loss.backward()
    return loss


def half_masks(n: int, count: int, seed: int) -> torch.Tensor:
    """``[count, n]`` 0/1 masks, each keeping a random half (``n // 2`` examples) drawn from ``(seed, k)``."""
    masks = torch.zeros(count, n)
    for k in range(count):
        masks[k, torch.randperm(n, generator=torch.Generator().manual_seed(seed + k))[: n // 2]] = 1
    return masks


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 0 of ``[K, m]`` values; ties share their mean rank."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    for col in range(values.shape[1]):
        column = values[:, col]
        _, inverse, counts = column.unique(return_inverse=True, return_counts=True)
        starts = counts.cumsum(0) - counts  # rank of each distinct value's first occurrence, from 0
        ranks[:, col] = (starts + (counts - 1) / 2.0).double()[inverse]
    return ranks


def spearman_columns(predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each column of ``predicted`` ``[K, m]`` with the same column of ``actual``."""
    a, b = _ranks(predicted.double()), _ranks(actual.double())
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)


def datamodeling_score(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Per-point LDS ``[m]``: ``scores`` ``[m, n]`` influences (positive = harmful), ``masks`` ``[K, n]`` the kept
    examples, ``losses`` ``[K, m]`` the subset models' losses.

    Leaving z out changes the loss by about ``-I(z, t) / n``, so a subset's loss is predicted, up to a constant,
    by the sum of the influences it kept.
    """
    predicted = masks.double() @ scores.double().T
    return spearman_columns(predicted, losses)


def retrain_on_halves(
    model: nn.Module,
    loss_fn: LossFn,
    train: IndexedData,
    check_batch: Batch,
    optimizer: OptimizerFactory,
    *,
    epochs: int,
    count: int = SELF_CHECK_RETRAININGS,
    batch_size: int = 32,
    seed: int = SELF_CHECK_SEED,
    on_epoch: Optional[Callable[[], None]] = None,
) -> Retrainings:
    """``count`` retrainings of ``model`` on random halves of ``train``, each from the current weights with a fresh
    ``optimizer(params)`` for ``epochs`` epochs of minibatches of ``batch_size`` on the mean of ``loss_fn``; the
    check points' losses after each. The model's weights, buffers, mode and gradients are restored afterwards.
    """
    if epochs < 1 or count < 2:
        raise ValueError(f"Expected epochs >= 1 and count >= 2 retrainings, but got epochs={epochs}, count={count}.")
    device = model_device(model)
    n = len(train)
    masks = half_masks(n, count, seed)
    check = prepare_batch(check_batch, device)
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in params]
    was_training = model.training
    start, losses = time.perf_counter(), []
    with torch.inference_mode(False), torch.enable_grad():  # Lightning's validation hooks run under no_grad
        try:
            for k in range(count):
                model.load_state_dict(state)
                model.train()
                opt = optimizer(params)
                kept = masks[k].nonzero().flatten()
                for epoch in range(epochs):
                    shuffle = torch.Generator().manual_seed(seed * 7919 + k * 101 + epoch)
                    order = kept[torch.randperm(len(kept), generator=shuffle)]
                    for s in range(0, len(order), batch_size):
                        batch = prepare_batch(train.fetch(order[s : s + batch_size].tolist()), device)
                        opt.step(functools.partial(_closure, opt, loss_fn, model, batch))  # type: ignore[arg-type]  # L-BFGS needs one
                    if on_epoch is not None:
                        on_epoch()
                model.eval()
                with torch.no_grad():
                    losses.append(call_loss_fn(loss_fn, model, check).detach().double().cpu())
        finally:
            model.load_state_dict(state)
            model.train(was_training)
            for p, g in zip(params, grads):
                p.grad = g
    return Retrainings(masks, torch.stack(losses), epochs, time.perf_counter() - start)


class SelfCheckUnaffordable(RuntimeError):
    """The candidates' solves would not fit the self-check's budget (the callbacks skip the check, say so in the
    solve record and use ``damping="auto"``); ``reason`` says why in a few words."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _affordable_iterations(problem: InfluenceProblem, gradients: torch.Tensor, retraining_seconds: float,
                           candidates: int, probe_vectors: Optional[int] = None) -> int:
    """CG iterations per candidate that fit ``SELF_CHECK_SOLVE_BUDGET`` times the retrainings' time (at least
    ``SELF_CHECK_SOLVE_FLOOR_SECONDS``: a small model's quick retrainings do not starve its solves), from a timed
    curvature product on one training batch scaled to the training set (the second of two: the first may choose
    its product form); an error that says what to do when fewer than ``SELF_CHECK_MIN_ITERATIONS`` fit. When the
    solves take their products from the stored output Jacobian (built here, once), the timed product is one from the
    store: on the tiny BERT of ``examples/text_classification.py`` it is far faster than autograd's. With
    ``probe_vectors`` only that many of the rows are timed and the time scaled to all of them (a product's cost grows
    about linearly in its vectors, so this errs high if anything)."""
    batch = next(problem.train_batches())
    size = max(batch_size_of(batch), 1)
    timed = gradients[:probe_vectors] if probe_vectors else gradients
    with torch.inference_mode(False), torch.enable_grad():
        unit = RowBatch(torch.arange(size)) if problem.products.stored() is not None else batch
        for _ in range(2):
            start = time.perf_counter()
            problem.minibatch_hvp(unit, timed)
            seconds = time.perf_counter() - start
    seconds *= gradients.shape[0] / max(timed.shape[0], 1)
    product = max(seconds * problem.residual_examples() / size, 1e-9)
    budget = max(SELF_CHECK_SOLVE_BUDGET * retraining_seconds, SELF_CHECK_SOLVE_FLOOR_SECONDS)
    fit = int(budget / (product * candidates))
    if fit < SELF_CHECK_MIN_ITERATIONS:
        needed = SELF_CHECK_MIN_ITERATIONS * product * candidates / max(retraining_seconds, 1e-9)
        reason = (f"solving its {candidates} candidates would take over {needed:.0f}x its retrainings' time on this"
                  f" model ({problem.num_params:,} parameters, {problem.residual_examples():,} training examples: a"
                  f" curvature product over the training set for its {gradients.shape[0]} check points takes about"
                  f" {product:.1f} s)")
        raise SelfCheckUnaffordable(f"damping='self_check' is too costly here: {reason}. Pass a number as `damping`,"
                                    " or damping='auto'.", reason)
    return min(fit, CGConfig().max_iter)


#: Before retraining, the self-check stops at once when its candidates' solves would not fit even this many times
#: the budget of the retrainings' time as estimated from one timed training step (a rough estimate: every other case
#: is decided after the retrainings, from their measured time). On ``benchmarks/scale.py``'s 1.0M-parameter CNN the
#: solves needed over two hundred times the retrainings' time, which themselves cost several epochs. The margin
#: allows for what one timed step leaves out (optimiser steps, data loading: most of a small model's retraining).
PRECHECK_MARGIN = 10.0
#: The precheck times its curvature product on this many of the check points' gradients and scales the time to all
#: of them (on ``benchmarks/scale.py``'s 1.0M-parameter CNN the precheck timed all 32, twice: 79.7 s in all).
PRECHECK_PROBE_VECTORS = 4


def precheck_affordable(model: nn.Module, loss_fn: LossFn, train: IndexedData, check_batch: Batch,
                        problem: ProblemConfig, *, epochs: int, batch_size: int, count: int = SELF_CHECK_RETRAININGS,
                        candidates: int = len(SELF_CHECK_CANDIDATES)) -> None:
    """Raise :func:`_affordable_iterations`' error before any retraining when the candidates' solves cannot fit
    ``PRECHECK_MARGIN`` times the budget of ``count`` retrainings of ``epochs`` epochs on half of ``train`` (their time
    estimated from one timed forward and backward pass of ``batch_size`` examples, in eval mode: no buffer moves);
    nothing for a model small enough for the dense solves."""
    base = InfluenceProblem(model, loss_fn, train.loader(), replace(problem, damping=1.0,
                                                                    solver=CGConfig(preconditioner="kfac")))
    if base.num_params <= EXACT_CHECK_PARAMETERS:
        return
    batch = prepare_batch(train.fetch(range(min(batch_size, len(train)))), model_device(model))
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            start = time.perf_counter()
            torch.autograd.grad(call_loss_fn(loss_fn, model, batch).mean(), params, allow_unused=True)
            step = time.perf_counter() - start
    finally:
        model.train(was_training)
    estimate = count * epochs * math.ceil(len(train) / 2 / max(batch_size, 1)) * step
    with analysis_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _affordable_iterations(base, base.gradients(check_batch), PRECHECK_MARGIN * estimate, candidates,
                               probe_vectors=PRECHECK_PROBE_VECTORS)


def check_damping(  # long: the candidates' solves share one problem and one scoring pass
    model: nn.Module,
    loss_fn: LossFn,
    train: IndexedData,
    check_batch: Batch,
    retrainings: Retrainings,
    problem: ProblemConfig,
    candidates: Sequence[float] = SELF_CHECK_CANDIDATES,
) -> DampingCheck:
    """The candidate damping whose influences on ``check_batch`` best predict ``retrainings`` (mean LDS).

    Each candidate is solved with ``problem``'s curvature, parameters and dtype, exactly whatever the solver of
    ``problem``: from one eigendecomposition of the dense curvature for models of at most
    ``EXACT_CHECK_PARAMETERS`` parameters (built from the stored output Jacobian when it is kept), else by
    K-FAC-preconditioned conjugate gradient. A candidate whose
    solve did not converge (or, under the Hessian, meets negative curvature) gets no score. The training set is
    scored once for all candidates.
    """
    if not candidates:
        raise ValueError("Expected at least one candidate damping.")
    start = time.perf_counter()
    base = InfluenceProblem(model, loss_fn, train.loader(), replace(problem, damping=float(candidates[0]),
                                                                    solver=CGConfig(preconditioner="kfac")))
    solutions: list[Optional[torch.Tensor]] = []
    with analysis_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a candidate's own warnings (e.g. raised damping) are not the user's
        gradients = base.gradients(check_batch)
        if base.num_params <= EXACT_CHECK_PARAMETERS:
            w, q = base.curvature_eigh()
            for damping in candidates:
                ok = float(w[0]) + float(damping) > 0
                solutions.append(ExactInverse(w, q, float(damping)).solve(gradients) if ok else None)
        else:
            iterations = _affordable_iterations(base, gradients, retrainings.seconds, len(candidates))
            for damping in candidates:
                setup = replace(problem, damping=float(damping),
                                solver=CGConfig(preconditioner="kfac", max_iter=iterations))
                solver_problem = base.with_settings(setup)  # one stored Jacobian for every candidate
                vectors, info = solve_s_test(solver_problem, gradients, SingleProcess(), None)
                ok = info.converged and solver_problem.damping == float(damping)
                solutions.append(vectors if ok else None)
        solved = [x for x in solutions if x is not None]
        if not solved:
            raise RuntimeError(f"damping='self_check': no candidate damping in {list(candidates)} gave a converged"
                               " solve. Pass a number as `damping`, or damping='auto'.")
        settings = ExplainConfig(top_k=1, keep_full_scores=True, diagnose=False)
        _, _, shard = score_training_set(base, train, torch.cat(solved), settings, SingleProcess(), None)
    assert shard is not None  # keep_full_scores=True
    table = shard.scores[:, shard.train_indices.argsort()].split(gradients.shape[0])
    per_candidate = iter(table)
    scores_lds: list[float] = []
    for x in solutions:
        if x is None:
            scores_lds.append(math.nan)
            continue
        per_point = datamodeling_score(next(per_candidate), retrainings.masks, retrainings.losses)
        finite = per_point[per_point.isfinite()]
        scores_lds.append(float(finite.mean()) if finite.numel() else math.nan)
    ranked = [(value, d) for value, d in zip(scores_lds, candidates) if math.isfinite(value)]
    if not ranked:
        raise RuntimeError("damping='self_check': the retrainings' losses did not vary (no finite LDS). Pass a number"
                           " as `damping`, or damping='auto'.")
    _, chosen = max(ranked)
    return DampingCheck(chosen=float(chosen), candidates=tuple(float(d) for d in candidates), lds=tuple(scores_lds),
                        points=int(retrainings.losses.shape[1]), retrainings=int(retrainings.masks.shape[0]),
                        epochs=retrainings.epochs, seconds=retrainings.seconds + time.perf_counter() - start,
                        retraining_seconds=retrainings.seconds)


def check_points(n_val: int, points: int = SELF_CHECK_POINTS, seed: int = SELF_CHECK_SEED) -> list[int]:
    """A seeded random sample of ``points`` validation indices (all of them when there are fewer)."""
    if n_val <= points:
        return list(range(n_val))
    return sorted(torch.randperm(n_val, generator=torch.Generator().manual_seed(seed))[:points].tolist())


__all__ = ["DampingCheck", "Retrainings", "check_damping", "check_points", "datamodeling_score", "half_masks",
           "precheck_affordable", "retrain_on_halves", "spearman_columns"]


def check_damping_by_retraining(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: DataLoader,
    val_batch: Batch,
    optimizer: OptimizerFactory,
    *,
    epochs: int,
    retrainings: int = SELF_CHECK_RETRAININGS,
    candidates: Sequence[float] = SELF_CHECK_CANDIDATES,
    problem: Optional[ProblemConfig] = None,
    seed: int = SELF_CHECK_SEED,
) -> DampingCheck:
    """``damping="self_check"`` outside a Trainer: retrain ``model`` ``retrainings`` times on random halves of the
    training set (warm-started, ``optimizer(params)`` fresh each time, ``epochs`` epochs in ``train_loader``'s batch
    size), then return the candidate damping whose influences on ``val_batch`` best predict those retrainings'
    losses. Pass ``check.chosen`` as ``damping`` to the other functions. The model is left as it was.

    ``optimizer`` builds an optimiser like the training's, e.g. ``lambda params: torch.optim.Adam(params, lr=1e-3)``;
    about half the training's epochs is what the callbacks use.
    """
    if not callable(optimizer):
        raise TypeError("Expected `optimizer` to be a function of the parameters returning a fresh optimiser, e.g."
                        " `lambda params: torch.optim.Adam(params, lr=1e-3)`.")
    train = IndexedData.from_loader(train_loader)
    config = replace(problem or ProblemConfig(), damping=DEFAULT_DAMPING)
    with torch.random.fork_rng():
        found = retrain_on_halves(model, loss_fn, train, val_batch, optimizer, epochs=epochs, count=retrainings,
                                  batch_size=train_loader.batch_size or 32, seed=seed)
        return check_damping(model, loss_fn, train, val_batch, found, config, candidates)
