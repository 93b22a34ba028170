"""Mislabel candidates: training examples ranked by self-influence, each rank scoring a shard, or by the
training signals recorded during the run when there are some (``docs/mislabel.md``).

``I(z, z) = -g^T (H + damping I)^-1 g`` for every training example from one factorised inverse (low-rank
Lanczos by default; exact for small models) and one pass of per-example gradients. The most negative values
mark the examples the model had to bend most to fit (Koh & Liang 2017, Sec. 5.4).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from lightning_influence.analysis.explain import Describe
from lightning_influence.analysis.noise_count import estimate_flip_count
from lightning_influence.analysis.training_signals import DEFAULT_SCORE, TrainingSignalRecorder, candidate_order
from lightning_influence.config import (
    MISLABEL_SHOWN,
    ProblemConfig,
    config_to_dict,
)
from lightning_influence.core.per_example.losses import LossFn, check_per_example_losses
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.batching import describe_batch, keeps_input, prepare_batch, row_value, thumbnail
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.memory import per_example_chunk
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.distributed.sharding import shard
from lightning_influence.results import MislabelCandidate, MislabelReport

#: With training signals and a candidate count ``m``, self-influence is computed only for the signals' most suspicious
#: ``SELF_INFLUENCE_POOL_FACTOR x m`` examples (at least ``MISLABEL_SHOWN``): the signals rank the candidates, and a
#: pass of per-example gradients over a large training set costs several epochs of a convolutional network's training
#: (``benchmarks/scale_units.py``). The other examples' self-influence is NaN; their loss is still measured.
SELF_INFLUENCE_POOL_FACTOR = 4


def self_influence_pool(recorder: Optional[TrainingSignalRecorder], top_m: Optional[int], size: int
                        ) -> Optional[list[int]]:
    """The training indices whose self-influence is computed (ascending), or None for all of them: all without
    recorded signals or with ``top_m=None`` (every example ranked), else the signals' most suspicious
    ``max(SELF_INFLUENCE_POOL_FACTOR * top_m, MISLABEL_SHOWN)``."""
    if recorder is None or not recorder.signals or top_m is None or recorder.num_train != size:
        return None
    count = max(SELF_INFLUENCE_POOL_FACTOR * top_m, MISLABEL_SHOWN)
    if count >= size:
        return None
    return sorted(candidate_order(recorder.scores(DEFAULT_SCORE), count).tolist())


def losses_shard(problem: InfluenceProblem, train: IndexedData, indices: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices, NaN self-influence, training loss)`` for examples outside the self-influence pool: a forward
    pass, no gradients."""
    kept, losses = [], []
    with torch.no_grad():
        for batch_indices, batch in train.batches_with_indices(indices):
            batch = prepare_batch(batch, problem.device)
            losses.append(check_per_example_losses(problem.loss.loss_fn(problem.model, batch),
                                                   len(batch_indices)).detach().cpu())
            kept.append(batch_indices)
    if not kept:
        return torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0)
    found = torch.cat(losses)
    return torch.cat(kept), torch.full_like(found, float("nan")), found


def self_influence_shard(
    problem: InfluenceProblem, train: IndexedData, indices: list[int], on_scored: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices, self-influence, training loss)`` for the examples ``indices`` of ``train``, in chunks whose
    per-example gradients stay within :func:`~lightning_influence.core.tensors.memory.per_example_chunk`'s budget
    (a chunk of 256 examples of a 1M-parameter model would otherwise hold 1 GB of gradients)."""
    if not problem.solver.factorised:
        raise ValueError("Expected a factorised solver ('lowrank' or 'exact') for self-influence of every example.")
    kept_indices, scores, losses = [], [], []
    chunk = per_example_chunk(problem.num_params, train.batch_size, problem.device)
    for batch_indices, batch in replace(train, batch_size=chunk).batches_with_indices(indices):
        batch = prepare_batch(batch, problem.device)
        grads = problem.gradients(batch)
        with torch.no_grad():
            loss = check_per_example_losses(problem.loss.loss_fn(problem.model, batch), len(batch_indices))
        kept_indices.append(batch_indices)
        scores.append(problem.self_influence(grads)[0].cpu())
        losses.append(loss.detach().cpu())
        if on_scored is not None:
            on_scored(len(batch_indices))
    if not kept_indices:
        return torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0)
    return torch.cat(kept_indices), torch.cat(scores), torch.cat(losses)


def find_mislabel_candidates(  # long: one pass of scores, the optional signal rankings, then the records
    model: nn.Module,
    loss_fn: LossFn,
    train: IndexedData,
    setup: ProblemConfig,
    top_m: Optional[int],
    *,
    epoch: int = 0,
    global_step: int = 0,
    collectives: Collectives | None = None,
    describe: Describe = describe_batch,
    on_scored: Callable[[int], None] | None = None,
    recorder: Optional[TrainingSignalRecorder] = None,
) -> MislabelReport:
    """The ``top_m`` most suspicious training examples (``None``: all), with the training-loss rank beside them.

    Without ``recorder`` (or before it has recorded, or on a rank other than 0, where the signals are not
    assembled) the candidates are ranked by self-influence, largest ``|I(z, z)|`` first. With the training
    signals of ``recorder`` they are ranked by its default score (:data:`DEFAULT_SCORE`); every named score
    (``self_influence`` = ``-I(z, z)``, ``loss`` at these weights, and the recorder's components) is kept in
    ``report.rankings``. Collective: every rank calls it.
    """
    collectives = collectives or SingleProcess()
    start = time.perf_counter()
    problem = InfluenceProblem(model, loss_fn, train.loader(), setup)
    pool = self_influence_pool(recorder, top_m, len(train))
    with analysis_mode(model):
        local = self_influence_shard(problem, train, shard(range(len(train)) if pool is None else pool,
                                                             collectives.rank, collectives.world_size), on_scored)
        if pool is not None:  # the rest: their training loss only
            rest = sorted(set(range(len(train))) - set(pool))
            others = losses_shard(problem, train, shard(rest, collectives.rank, collectives.world_size))
            local = (torch.cat([local[0], others[0]]), torch.cat([local[1], others[1]]),
                     torch.cat([local[2], others[2]]))
        parts = collectives.gather_objects(local)
        order = torch.cat([p[0] for p in parts]).argsort()
        scores = torch.cat([p[1] for p in parts])[order]
        losses = torch.cat([p[2] for p in parts])[order]
        loss_rank = torch.empty_like(order)
        loss_rank[losses.argsort(descending=True, stable=True)] = torch.arange(len(losses))
        rankings: dict[str, torch.Tensor] = {"self_influence": -scores, "loss": losses}
        ranking, signals, suggested, flip_count = "self_influence", None, None, None
        if recorder is not None and recorder.signals:
            if recorder.num_train != len(train):
                raise ValueError(f"Expected training signals for {len(train)} examples, but the recorder has"
                                 f" {recorder.num_train}: record them on the same training set.")
            rankings.update(recorder.component_scores())
            ranking, suggested = DEFAULT_SCORE, recorder.suggested_labels()
            signals = {"epochs": list(recorder.epochs_recorded), "seconds": float(recorder.seconds),
                       "default": DEFAULT_SCORE, "self_influence_examples": len(train) if pool is None else len(pool)}
            try:
                flip_count = estimate_flip_count(recorder).to_dict()
            except RuntimeError:  # signals resumed from an older checkpoint without probabilities: no count
                flip_count = None
        chosen = candidate_order(rankings[ranking], top_m).tolist()
        flagged = None if flip_count is None else flip_count["flagged"]
        candidates = _candidates(problem, train, chosen, describe, scores, losses, loss_rank, rankings[ranking],
                                 suggested, flagged)
    solver = replace(problem.solve_info(problem.solver.name, True, torch.zeros(0), torch.zeros(0), use_residual=False,
                                        compute_residual=False),
                     seconds=time.perf_counter() - start, settings=config_to_dict(setup.solver_config))
    return MislabelReport(epoch, global_step, len(train), candidates, solver, time.perf_counter() - start, scores,
                          ranking=ranking, rankings=rankings, signals=signals, flip_count=flip_count)


def _candidates(problem: InfluenceProblem, train: IndexedData, chosen: list[int], describe: Describe,
                scores: torch.Tensor, losses: torch.Tensor, loss_rank: torch.Tensor, ranked_by: torch.Tensor,
                suggested: Optional[torch.Tensor], flagged: Optional[int] = None) -> tuple[MislabelCandidate, ...]:
    """The records of the ``chosen`` examples, described in chunks: the input itself for the first
    ``MISLABEL_SHOWN`` (the TensorBoard grid draws them), a small :func:`thumbnail` of it for every other one.

    ``chosen`` is in ranking order, so with ``flagged`` (the number of examples flagged) the first ``flagged``
    are the flagged ones.
    """
    out: list[MislabelCandidate] = []
    step = max(1, train.batch_size)
    for begin in range(0, len(chosen), step):
        indices = chosen[begin: begin + step]
        info = describe(problem.model, prepare_batch(train.fetch(indices), problem.device))
        kept = info.inputs is not None and keeps_input(info.inputs[0])  # images and small inputs
        for row, index in enumerate(indices):
            x = None
            if kept and info.inputs is not None:
                x = info.inputs[row].detach().cpu() if begin + row < MISLABEL_SHOWN else thumbnail(info.inputs[row])
            out.append(MislabelCandidate(
                train_index=int(index), self_influence=float(scores[index]), loss=float(losses[index]),
                loss_rank=int(loss_rank[index]), label=row_value(info.labels, row),
                prediction=row_value(info.predictions, row),
                input=x,
                text=None if info.texts is None else info.texts[row],
                score=None if suggested is None else float(ranked_by[index]),
                suggested_label=None if suggested is None else int(suggested[index]),
                flagged=None if flagged is None else begin + row < flagged,
            ))
    return tuple(out)
