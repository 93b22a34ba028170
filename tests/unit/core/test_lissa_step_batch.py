"""LiSSA's step batch rule (``LissaConfig.shrink_batch``) and its sampled early-stop checks, on training sets larger
than the check subset (where the recursion's cost matters)."""

from __future__ import annotations

import torch
from helpers import cross_entropy_per_example, digits, loader
from torch import nn

from lightning_influence.config import CHECK_MIN_EXAMPLES, LISSA_STEP_BATCHES, ExactConfig, LissaConfig
from lightning_influence.core import InfluenceProblem
from lightning_influence.core.solvers.neumann import series_steps
from lightning_influence.core.solvers.step_batch import shrink_applies
from lightning_influence.core.tensors.batching import batch_size_of
from lightning_influence.core.tensors.modes import analysis_mode

DAMPING = 0.05


def _fitted(n: int):
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # full-batch Adam: fitted, not converged
        optimizer.zero_grad()
        cross_entropy_per_example(model, (x[:n], y[:n])).mean().backward()
        optimizer.step()
    return model, loader(x[:n], y[:n]), (x[1700:1704], y[1700:1704])


def _lissa(model, train, subset: int, store_jacobian: bool = True, **options) -> InfluenceProblem:
    config = LissaConfig(route="recursion", **options)
    return InfluenceProblem(model, cross_entropy_per_example, train, DAMPING, config, subset_examples=subset,
                            store_jacobian=store_jacobian)


def test_the_rule_keeps_the_batch_size_of_least_predicted_work_with_its_own_scale():
    model, train, _ = _fitted(1000)
    with analysis_mode(model):
        problem = _lissa(model, train, subset=256, shrink_batch=True)
        solver = problem.solver
        assert shrink_applies(solver)
        solver.choose_batch()
        probed = solver._chosen[1]
        assert sorted(probed) == sorted({128, *(b for b in LISSA_STEP_BATCHES if b < 128)})
        # each probed scale is the scale="auto" estimate on minibatches of that size (seeded: reproducible)
        for size, scale in probed.items():
            assert abs(solver.estimate_scale(batch_size=size) - scale) <= 1e-9 * scale
        work = {b: series_steps(s, DAMPING, 0.05) * b for b, s in probed.items()}
        chosen = solver.step_batch_size
        assert work[chosen] == min(work.values()) and solver.scale == probed[chosen]
        assert all(work[b] > work[chosen] or b <= chosen for b in work)  # a tie keeps the larger size
        assert batch_size_of(next(solver.stream(0))) == chosen
        # off (the default), with a given scale or a check subset that is the whole set: `batch_size`, no probes
        for off in (_lissa(model, train, subset=256), _lissa(model, train, subset=256, shrink_batch=True, scale=50.0),
                    _lissa(model, train, subset=None, shrink_batch=True)):
            off.solver.choose_batch()
            assert off.solver.step_batch_size == 128 and off.solver._chosen is None


def test_a_solve_under_the_rule_meets_the_whole_set_verdict_that_an_exact_solve_confirms():
    model, train, test = _fitted(1000)
    with analysis_mode(model):
        exact = InfluenceProblem(model, cross_entropy_per_example, train, DAMPING, ExactConfig(), subset_examples=None)
        vectors = exact.gradients(test)
        reference = exact.solve(vectors).vectors
        problem = _lissa(model, train, subset=256, depth=3000, shrink_batch=True)
        found = problem.solve(vectors)
        # the residual over all 1,000 examples, measured by the exact problem (no memo, no sampling)
        total, count = exact.check_product(found.vectors)
        applied = total / count + DAMPING * found.vectors
        residual = ((applied - vectors).norm(dim=1) / vectors.norm(dim=1)).max()
    info = found.info
    assert str(info.settings["step_batch_size"]) in info.settings["batch_scales"]
    assert set(info.settings["batch_scales"]) == {"128", *(str(b) for b in LISSA_STEP_BATCHES if b < 128)}
    assert info.converged and info.residual <= 0.05 and info.iterations < 3000
    assert residual <= 0.05 + 0.02  # the sampled verdict's side holds (z = 3) up to its standard error
    assert (torch.nn.functional.cosine_similarity(found.vectors, reference, dim=1) > 0.99).all()


class _Counting:
    """The problem's curvature products, counting the examples each check reads."""

    def __init__(self, products) -> None:
        self.products, self.examples = products, 0

    def __call__(self, batch, vectors):
        self.examples += batch_size_of(batch)
        return self.products(batch, vectors)

    def __getattr__(self, name):
        return getattr(self.products, name)


def test_the_sampled_check_reads_few_examples_far_from_the_tolerance_and_agrees_with_the_whole_subset():
    model, train, test = _fitted(1500)
    subset = 1024
    assert subset > CHECK_MIN_EXAMPLES
    with analysis_mode(model):
        exact = InfluenceProblem(model, cross_entropy_per_example, train, DAMPING, ExactConfig(), subset_examples=None)
        vectors = exact.gradients(test)
        solution = exact.solve(vectors).vectors
        problem = _lissa(model, train, subset=subset, store_jacobian=False)  # checks read batches of 128 examples
        counting = _Counting(problem.products)
        problem.products = counting
        far = problem.check_residual(torch.zeros_like(vectors), vectors)  # residual 1 for every row
        assert torch.allclose(far, torch.ones_like(far)) and counting.examples == CHECK_MIN_EXAMPLES
        for x in (solution, 0.9 * solution, 0.97 * solution):
            counting.examples = 0
            sampled = problem.check_residual(x, vectors)
            read = counting.examples
            total, count = problem.check_product(x)
            whole = ((total / count + DAMPING * x - vectors).norm(dim=1) / vectors.norm(dim=1))
            assert CHECK_MIN_EXAMPLES <= read <= subset
            if read == subset:  # undecided rows read the whole subset: then it is the subset's own residual
                assert torch.allclose(sampled, whole)
            assert ((sampled <= 0.05) == (whole <= 0.05)).all()  # a decided check is on the subset's side
