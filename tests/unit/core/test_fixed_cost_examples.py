"""The fixed costs do not grow with N: the damping estimate, LiSSA's scale and the low-rank solver's Lanczos run
take their curvature products over a bounded number of training examples, the same at N = 3,000 and N = 6,000
(``docs/cost-and-scale.md``); only the solve's residual verdict reads the whole set."""

from __future__ import annotations

import torch
from helpers import cross_entropy_per_example
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.config import LissaConfig, LowRankConfig, ProblemConfig
from lightning_influence.config.defaults import CURVATURE_EXAMPLES
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.batching import batch_size_of
from lightning_influence.core.tensors.modes import analysis_mode


def examples_touched(n: int, solver) -> dict[str, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    data = TensorDataset(torch.randn(n, 10), torch.randint(0, 3, (n,)))
    problem = InfluenceProblem(model, cross_entropy_per_example, DataLoader(data, batch_size=64),
                               ProblemConfig(solver=solver, damping="auto"), store_jacobian=False)
    seen = {"count": 0}
    product = problem.products.autograd

    def counted(batch, vectors):
        seen["count"] += batch_size_of(batch)
        return product(batch, vectors)

    problem.products.autograd = counted
    out = {}
    with analysis_mode(model):
        problem.damping_choice()
        out["damping"] = seen["count"]
        if isinstance(solver, LissaConfig):
            _ = problem.solver.scale
            out["scale"] = seen["count"] - out["damping"]
        else:
            problem.solver.inverse()
            out["lanczos"] = seen["count"] - out["damping"]
    return out


def test_damping_estimate_and_lissa_scale_use_a_bounded_number_of_examples():
    small, large = examples_touched(3000, LissaConfig()), examples_touched(6000, LissaConfig())
    assert small == large  # the same seeded check subset and probe minibatches, whatever N
    per_product = CURVATURE_EXAMPLES  # each Lanczos step is one product over the curvature subsample
    assert 0 < small["damping"] <= 40 * per_product and small["damping"] % per_product == 0
    assert 0 < small["scale"] <= 40 * LissaConfig().batch_size


def test_low_rank_lanczos_uses_its_hvp_examples_whatever_n():
    config = LowRankConfig(rank=4)
    small, large = examples_touched(3000, config), examples_touched(6000, config)
    assert small == large
    assert small["lanczos"] % config.hvp_examples == 0 and small["lanczos"] > 0
