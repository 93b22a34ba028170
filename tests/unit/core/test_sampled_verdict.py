"""The solve's verdict on a training set larger than the check subset: a seeded random sample of it, read until
every row is decided (``core.tensors.residual.sampled_residual``), with its standard error in the record."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy_per_example
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.config import RESIDUAL_TOL, LissaConfig, ProblemConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.core.tensors.residual import VERDICT_Z, relative_residual, sampled_residual

N, SUBSET, DAMPING = 4000, 256, 0.05


def _problem(solver="lissa") -> InfluenceProblem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    inputs = torch.randn(N, 10, dtype=torch.float64)
    labels = (inputs[:, :3].argmax(dim=1) + (torch.rand(N) < 0.2).long()) % 3
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):  # a few full-batch steps: not converged
        optimizer.zero_grad()
        cross_entropy_per_example(model, (inputs, labels)).mean().backward()
        optimizer.step()
    data = DataLoader(TensorDataset(inputs, labels), batch_size=64)
    return InfluenceProblem(model, cross_entropy_per_example, data, ProblemConfig(solver=solver, damping=DAMPING),
                            subset_examples=SUBSET, store_jacobian=False)


def _whole_residual(problem: InfluenceProblem, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    total, count = problem.check_product(x, whole=True)
    return relative_residual(problem.damped(total / count, x), vectors)


def _exact_solution(problem: InfluenceProblem, vectors: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(problem.num_params, dtype=vectors.dtype)
    total, count = problem.check_product(eye, whole=True)
    return torch.linalg.solve(total / count + DAMPING * eye, vectors.T).T


def _at_residual(problem, exact, vectors, target):
    """A solution whose whole-set residual is ``target`` in every row: the exact one plus a scaled random error."""
    error = torch.randn(exact.shape, generator=torch.Generator().manual_seed(3), dtype=exact.dtype)
    scaled = error * (target / _whole_residual(problem, exact + error, vectors))[:, None]
    return exact + scaled


@pytest.fixture(scope="module")
def setup():
    problem = _problem()
    with analysis_mode(problem.model):
        vectors = problem.gradients(tuple(t[:4] for t in next(iter(problem.train_loader))))
        exact = _exact_solution(problem, vectors)
    return problem, vectors, exact


def test_a_clear_verdict_reads_a_sample_and_is_unbiased_within_its_error(setup):
    problem, vectors, exact = setup
    with analysis_mode(problem.model):
        for target, converged in ((0.01, True), (0.2, False)):
            x = _at_residual(problem, exact, vectors, target)
            truth = _whole_residual(problem, x, vectors)
            rows = problem.residual(x, vectors)
            estimate = problem.residual_estimate(x, vectors)
            assert estimate is not None and estimate.sampled and SUBSET <= estimate.examples < N
            assert bool((rows <= RESIDUAL_TOL).all()) is converged  # the side of the tolerance is the truth's
            assert bool((truth <= RESIDUAL_TOL).all()) is converged
            assert ((rows - truth).abs() <= VERDICT_Z * estimate.errors + 1e-9).all()
            assert (estimate.errors > 0).all()


def test_a_row_near_the_tolerance_reads_the_whole_set_and_is_exact(setup):
    problem, vectors, exact = setup
    with analysis_mode(problem.model):
        x = _at_residual(problem, exact, vectors, RESIDUAL_TOL * 1.01)  # just above: never called converged
        rows = problem.residual(x, vectors)
        estimate = problem.residual_estimate(x, vectors)
        truth = _whole_residual(problem, x, vectors)
    assert estimate is not None and estimate.examples == N and not estimate.sampled
    assert torch.allclose(rows, truth, rtol=1e-9) and (rows > RESIDUAL_TOL).all()
    assert (estimate.errors == 0).all()


def test_never_converged_when_the_whole_set_says_otherwise(setup):
    """Just above the tolerance at several distances: the sampled verdict never says converged."""
    problem, vectors, exact = setup
    with analysis_mode(problem.model):
        for factor in (1.02, 1.1, 1.3, 2.0):
            x = _at_residual(problem, exact, vectors, RESIDUAL_TOL * factor)
            assert (problem.residual(x, vectors) > RESIDUAL_TOL).all()


def test_sampled_residual_stops_once_decided_and_not_before_min_examples():
    """A product with no spread between batches: decided at the first check after ``min_examples``."""
    x, vectors = torch.ones(2, 5), torch.ones(2, 5)
    batches = [(None, 10)] * 100
    decided = sampled_residual(lambda _: vectors.clone(), iter(batches), x, vectors, 0.0, 1000, 0.05,
                               min_examples=300)
    assert decided.examples == 300 and torch.allclose(decided.rows, torch.zeros(2))
    far = sampled_residual(lambda _: torch.zeros(2, 5), iter(batches), x, vectors, 3.0, 1000, 0.05, min_examples=300)
    assert far.examples == 300 and torch.allclose(far.rows, torch.full((2,), 2.0))


def test_the_solve_record_reports_the_sample_and_agrees_with_its_verdict():
    problem = _problem(LissaConfig(depth=200, refine=False))
    with analysis_mode(problem.model):
        vectors = problem.gradients(tuple(t[:3] for t in next(iter(problem.train_loader))))
        info = problem.solve(vectors).info
    estimate = info.settings["residual_estimate"]
    assert estimate["of"] == N and SUBSET <= estimate["examples"] < N and estimate["standard_error"] > 0
    assert info.converged is (info.residual <= info.residual_tol)


def test_the_explanation_record_keeps_the_verdict_sample_and_the_trust_report_its_size():
    from lightning_influence.analysis.explain import explain
    from lightning_influence.config import ExplainConfig
    from lightning_influence.config.defaults import SUBSET_EXAMPLES
    from lightning_influence.core.tensors.data import IndexedData

    torch.manual_seed(0)
    n = SUBSET_EXAMPLES + 1000
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    inputs, labels = torch.randn(n + 20, 10), torch.randint(0, 3, (n + 20,))
    train = IndexedData(TensorDataset(inputs[:n], labels[:n]), batch_size=128)
    val = IndexedData(TensorDataset(inputs[n:], labels[n:]))
    found = explain(model, cross_entropy_per_example, train, val,
                    ProblemConfig(solver=LissaConfig(depth=300, check_every=0, refine=False), damping=0.5),
                    ExplainConfig(top_k=3, num_worst=2))
    assert found.solver.residual < 0.03  # well below the tolerance: decided on a sample
    estimate = found.solver.settings["residual_estimate"]
    assert estimate["of"] == n and SUBSET_EXAMPLES <= estimate["examples"] <= n
    assert found.trust.residual_examples == estimate["examples"]
    assert found.solver.converged is (found.solver.residual <= found.solver.residual_tol)
