"""The ``scale="auto"`` estimate split over ranks: the maximum of the parts is exactly the one-process estimate."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import cross_entropy_per_example, digits, loader
from helpers.distributed import ThreadGroup, ThreadRank, run_ranks
from torch import nn

from lightning_influence.config import LissaConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.distributed.collectives import SingleProcess
from lightning_influence.distributed.solve import solve_s_test


@pytest.fixture(scope="module")
def problem_parts():
    x, y = digits(torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    config = LissaConfig(depth=10, repeats=2, batch_size=16, seed=0, refine=False)  # the recursion alone
    return model, loader(x[:200], y[:200], 50), config, (x[1500:1503], y[1500:1503])


@pytest.mark.parametrize("world_size", [2, 3, 9])  # 9 > the 8 probe batches: one rank measures none
def test_the_largest_part_is_the_single_process_estimate(problem_parts, world_size):
    model, train, config, _ = problem_parts
    problem = InfluenceProblem(model, cross_entropy_per_example, train, 0.01, config)
    with analysis_mode(model):
        whole = problem.solver.estimate_scale()
        parts = [problem.solver.estimate_scale((rank, world_size)) for rank in range(world_size)]
        assert max(parts) == whole  # bit for bit: same batches, same start vectors
        assert problem.solver.scale == whole


def test_two_ranks_solve_with_the_single_process_scale(problem_parts):
    model, train, config, test = problem_parts
    reference = InfluenceProblem(model, cross_entropy_per_example, train, 0.01, config)
    with analysis_mode(model):
        expected, info = solve_s_test(reference, reference.gradients(test), SingleProcess(), None)
    group, results = ThreadGroup(2), [None, None]

    def run(rank: int) -> None:
        own = copy.deepcopy(model)
        problem = InfluenceProblem(own, cross_entropy_per_example, train, 0.01, config)
        with group.compute, analysis_mode(own):
            results[rank] = (problem.solver.has_scale, *solve_s_test(problem, problem.gradients(test),
                                                                    ThreadRank(group, rank), None))

    run_ranks(2, run)
    for had_scale, vectors, rank_info in results:
        assert not had_scale and rank_info.scale == info.scale
        torch.testing.assert_close(vectors, expected, rtol=1e-9, atol=1e-12)
