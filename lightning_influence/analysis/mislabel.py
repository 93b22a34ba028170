"""Mislabel candidates: training examples ranked by self-influence, each rank scoring a shard.

``I(z, z) = -g^T (H + damping I)^-1 g`` for every training example from one factorised inverse (low-rank
Lanczos by default; exact for small models) and one pass of per-example gradients. The most negative values
mark the examples the model had to bend most to fit (Koh & Liang 2017, Sec. 5.4).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from lightning_influence.analysis.explain import Describe
from lightning_influence.config import DEFAULT_CURVATURE, Damping, ExactConfig, LowRankConfig, config_to_dict, solver_name
from lightning_influence.core.batching import describe_batch, keeps_input, prepare_batch, row_value
from lightning_influence.core.data import IndexedData
from lightning_influence.core.losses import LossFn, check_per_example_losses
from lightning_influence.core.modes import analysis_mode
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.distributed.sharding import shard
from lightning_influence.results import MislabelCandidate, MislabelReport


def self_influence_shard(
    problem: InfluenceProblem, train: IndexedData, indices: list[int], on_scored: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices, self-influence, training loss)`` for the examples ``indices`` of ``train``."""
    inverse = problem.inverse_operator()
    if inverse is None:
        raise ValueError("Expected a factorised solver ('lowrank' or 'exact') for self-influence of every example.")
    kept_indices, scores, losses = [], [], []
    for batch_indices, batch in train.batches_with_indices(indices):
        batch = prepare_batch(batch, problem.device)
        grads = problem.gradients(batch)
        with torch.no_grad():
            loss = check_per_example_losses(problem.loss.loss_fn(problem.model, batch), len(batch_indices))
        kept_indices.append(batch_indices)
        scores.append(-inverse.quadratic_forms(grads).cpu())
        losses.append(loss.detach().cpu())
        if on_scored is not None:
            on_scored(len(batch_indices))
    if not kept_indices:
        return torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0)
    return torch.cat(kept_indices), torch.cat(scores), torch.cat(losses)


def find_mislabel_candidates(
    model: nn.Module,
    loss_fn: LossFn,
    train: IndexedData,
    config: Union[LowRankConfig, ExactConfig],
    damping: Damping,
    top_m: int,
    *,
    epoch: int = 0,
    global_step: int = 0,
    collectives: Collectives | None = None,
    describe: Describe = describe_batch,
    on_scored: Callable[[int], None] | None = None,
    weight_decay: Optional[float] = None,
    curvature: str = DEFAULT_CURVATURE,
) -> MislabelReport:
    """The ``top_m`` training examples with the largest ``|I(z, z)|``, with the training-loss rank beside them."""
    collectives = collectives or SingleProcess()
    start = time.perf_counter()
    problem = InfluenceProblem(model, loss_fn, train.loader(), damping, config, curvature=curvature,
                               weight_decay=weight_decay)
    with analysis_mode(model):
        local = self_influence_shard(problem, train, shard(range(len(train)), collectives.rank,
                                                             collectives.world_size), on_scored)
        parts = collectives.gather_objects(local)
        order_indices = torch.cat([p[0] for p in parts])
        order = order_indices.argsort()
        scores = torch.cat([p[1] for p in parts])[order]
        losses = torch.cat([p[2] for p in parts])[order]
        loss_rank = torch.empty_like(order)
        loss_rank[losses.argsort(descending=True, stable=True)] = torch.arange(len(losses))
        chosen = scores.argsort(stable=True)[:top_m]  # most negative first
        batch = prepare_batch(train.fetch(chosen.tolist()), problem.device)
        info = describe(model, batch)
    images = info.inputs is not None and keeps_input(info.inputs[0])  # images and small inputs
    candidates = tuple(
        MislabelCandidate(
            train_index=int(index),
            self_influence=float(scores[index]),
            loss=float(losses[index]),
            loss_rank=int(loss_rank[index]),
            label=row_value(info.labels, row),
            prediction=row_value(info.predictions, row),
            input=info.inputs[row].detach().cpu() if images and info.inputs is not None else None,
            text=None if info.texts is None else info.texts[row],
        )
        for row, index in enumerate(chosen.tolist())
    )
    solver = replace(problem.solve_info(solver_name(config), True, torch.zeros(0), torch.zeros(0), use_residual=False,
                                        compute_residual=False),
                     seconds=time.perf_counter() - start, settings=config_to_dict(config))
    return MislabelReport(epoch, global_step, len(train), candidates, solver, time.perf_counter() - start, scores)
