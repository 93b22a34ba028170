"""Simulated ranks for tests: threads that implement the Collectives protocol in one process."""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch

from helpers import cross_entropy_per_example
from lightning_influence.analysis.explain import explain
from lightning_influence.config import ExactConfig, ExplainConfig, ProblemConfig
from lightning_influence.core.tensors.data import IndexedData


class ThreadGroup:
    """In-process ranks (threads) implementing the Collectives protocol, to run `explain` on R "ranks".

    Only one rank computes at a time (``compute`` lock, released inside collectives): torch.func's forward AD
    keeps global state that concurrent threads would share.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.slots: list[Any] = [None] * world_size
        self.wait = threading.Barrier(world_size, timeout=120)
        self.compute = threading.Lock()


class ThreadRank:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def gather_objects(self, obj: Any) -> list[Any]:
        self.group.compute.release()
        try:
            self.group.wait.wait()
            self.group.slots[self.rank] = obj
            self.group.wait.wait()
            gathered = list(self.group.slots)
            self.group.wait.wait()  # nobody overwrites a slot before every rank has read it
        finally:
            self.group.compute.acquire()
        return gathered

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.gather_objects(tensor)).sum(0)

    def barrier(self) -> None:
        self.group.wait.wait()


def run_ranks(world_size: int, run) -> None:
    """Call ``run(rank)`` on ``world_size`` threads at once and wait for all of them."""
    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def explain_on_threads(world_size: int, model, train: IndexedData, val: IndexedData, settings: ExplainConfig,
                       damping: float):
    """``explain`` with the exact solver on ``world_size`` thread ranks; every rank's result."""
    group, results = ThreadGroup(world_size), [None] * world_size

    def run(rank: int) -> None:
        with group.compute:
            problem = ProblemConfig(solver=ExactConfig(), damping=damping)
            results[rank] = explain(copy.deepcopy(model), cross_entropy_per_example, train, val, problem, settings,
                                    ThreadRank(group, rank))

    run_ranks(world_size, run)
    assert all(result is not None for result in results), "a rank failed (see the thread exception above)"
    return results


def scored_indices(explanation) -> torch.Tensor:
    """``[points, k]`` sorted training indices that got a score (each point's candidates)."""
    table = explanation.full_scores
    return torch.stack([(~row.isnan()).nonzero().flatten() for row in table])
