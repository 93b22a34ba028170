"""Distributed s_test: the solver's work split over ranks by its ``split`` and combined by sums over ranks.

LiSSA (``split="repeats"``): rank r runs repeats r, r+R, ... (FastIF's scheme); CG (``"points"``): rank r solves
test points r, r+R, ...; ``exact`` and ``lowrank`` (``"whole"``) are solved whole on every rank. Each solver
splits its own work (:mod:`~lightning_influence.core.solvers`); this module hands it the ranks, as the
collectives plus the gather that carries a failure to every rank. With :class:`SingleProcess` collectives this
is the single-process solve the functional API uses, so one code path serves one process and many.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Optional, TypeVar

import torch
from torch import nn

from lightning_influence.config import ProblemConfig
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.trajectory import Snapshot, SnapshotSolve, check_snapshot, using_weights
from lightning_influence.distributed.collectives import Collectives
from lightning_influence.distributed.sharding import gather_checked
from lightning_influence.results import SolveInfo

T = TypeVar("T")


class CollectiveRanks:
    """:class:`~lightning_influence.core.solvers.Ranks` from :class:`Collectives`: the sum is theirs, the gather
    is :func:`gather_checked` (a failure on one rank raises on every rank)."""

    def __init__(self, collectives: Collectives) -> None:
        self.collectives = collectives

    @property
    def rank(self) -> int:
        return self.collectives.rank

    @property
    def world_size(self) -> int:
        return self.collectives.world_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.collectives.sum(tensor)

    def gather(self, compute: Callable[[], T], share: Callable[[T], Any] = lambda value: value) -> tuple[T, list[Any]]:
        return gather_checked(self.collectives, compute, share)


def solve_s_test(
    problem: InfluenceProblem, gradients: torch.Tensor, collectives: Collectives, on_step: Callable[[], None] | None
) -> tuple[torch.Tensor, SolveInfo]:
    """s_test, with the work split over ranks and combined by sums (all-reduce); the same answer on every rank."""
    result = problem.solve(gradients, on_step, CollectiveRanks(collectives))
    return result.vectors, result.info


def solve_s_test_with_halves(
    problem: InfluenceProblem, gradients: torch.Tensor, collectives: Collectives, on_step: Callable[[], None] | None
) -> tuple[torch.Tensor, SolveInfo, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`solve_s_test`, plus the means of the even- and the odd-numbered repeats of a stochastic solver (None
    for fewer than 2 repeats or a deterministic solver), for the repeat-agreement diagnosis."""
    result = problem.solve(gradients, on_step, CollectiveRanks(collectives))
    return result.vectors, result.info, result.halves


def solve_snapshots(model: nn.Module, loss_fn: LossFn, train_loader: Iterable[Batch], setup: ProblemConfig,
                    damping: float, test_batch: Batch, snapshots: Sequence[Snapshot], collectives: Collectives
                    ) -> list[SnapshotSolve]:
    """Each weight snapshot's own problem and s_test rows for ``test_batch`` (its gradients taken with the
    snapshot's weights), at ``damping``: the value the current weights resolved, so every member is damped alike."""
    members = []
    for snapshot in snapshots:
        check_snapshot(model, snapshot)
        with using_weights(model, snapshot):
            problem = InfluenceProblem(model, loss_fn, train_loader, replace(setup, damping=damping))
            result = problem.solve(problem.gradients(test_batch), None, CollectiveRanks(collectives))
        members.append(SnapshotSolve(snapshot, problem, result.vectors, result.info))
    return members
