"""LiSSA that never silently fails: residual-based `converged`, early stop, divergence recovery with retries."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy_per_example, digits, loader
from scipy.stats import pearsonr
from torch import nn

import lightning_influence as li
from lightning_influence.config import ExactConfig, LissaConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers.neumann import SCALE_MARGIN
from lightning_influence.core.tensors.modes import analysis_mode


@pytest.fixture(scope="module")
def sgd_mlp():
    """A 64-16-10 tanh MLP after 3 SGD epochs (lr 0.3, weight decay 1e-3) on 500 digits: not converged."""
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    x, y = x[:500].flatten(1), y[:500]
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=1e-3)
    for _ in range(3):
        for idx in torch.randperm(500).split(32):
            optimizer.zero_grad()
            cross_entropy_per_example(model, (x[idx], y[idx])).mean().backward()
            optimizer.step()
    with torch.no_grad():
        test_x, test_y = digits(torch.float64)[0][1500:1600].flatten(1), digits(torch.float64)[1][1500:1600]
        worst = cross_entropy_per_example(model, (test_x, test_y)).topk(3).indices
    return model, x, y, (test_x[worst], test_y[worst])


def test_lissa_on_gauss_newton_matches_the_exact_gauss_newton_solve(sgd_mlp):
    model, x, y, test = sgd_mlp
    train = loader(x, y, 100)
    lissa = InfluenceProblem(model, cross_entropy_per_example, train, "auto", LissaConfig(), weight_decay=1e-3)
    with analysis_mode(model):
        v = lissa.gradients(test)
        result = lissa.solve(v)
        exact = InfluenceProblem(model, cross_entropy_per_example, train, result.info.damping, ExactConfig())
        reference = exact.solve(v)
        grads = torch.cat([lissa.gradients(batch) for batch in train])
    info = result.info
    assert info.curvature == "gauss_newton" and info.damping_requested == "auto" and not info.retries
    assert info.converged == (info.residual <= info.residual_tol)
    for point in range(3):
        r = pearsonr((grads @ result.vectors[point]).numpy(), (grads @ reference.vectors[point]).numpy())[0]
        assert r >= 0.99, f"point {point}: Pearson {r:.4f}"


def test_a_too_small_scale_is_recovered_and_the_retry_recorded(sgd_mlp):
    model, x, y, test = sgd_mlp
    config = LissaConfig(depth=300, batch_size=50, scale=1e-3, route="recursion")  # the series, not CG's route
    problem = InfluenceProblem(model, cross_entropy_per_example, loader(x, y, 100), "auto", config)
    with analysis_mode(model):
        result = problem.solve(problem.gradients(test))
    retries = result.info.retries
    assert 1 <= len(retries) <= config.max_retries
    first = retries[0]
    assert first["reason"].startswith("minibatch eigenvalue spike") and first["scale_before"] == 1e-3
    # measured on the diverging minibatch: the recursion is stable there from then on (2 * scale above it)
    assert first["scale_after"] >= SCALE_MARGIN * first["batch_eigenvalue_max"] > 0.5 * first["batch_eigenvalue_max"]
    assert result.info.scale == retries[-1]["scale_after"] and torch.isfinite(result.vectors).all()


def test_divergence_after_the_last_retry_names_the_measured_eigenvalues(sgd_mlp):
    model, x, y, test = sgd_mlp
    with pytest.raises(li.LissaDivergenceError,
                       match=r"increase `scale`.*after 0 retries.*minibatch at the divergence \[.*check subset \["):
        li.s_test(model, cross_entropy_per_example, loader(x, y, 100), test, scale=1e-4, max_retries=0, depth=100,
                   route="recursion")
    linear = nn.Linear(64, 3).double()

    def concave(m, batch):  # negative definite Hessian: no scale can make LiSSA converge at damping 0
        return -0.5 * (m(batch[0]) ** 2).sum(dim=1)

    options = {"curvature": "hessian", "damping": 0.0, "depth": 300, "batch_size": 50}
    with pytest.warns(UserWarning, match="allow_negative_curvature=True"), pytest.raises(
            li.LissaDivergenceError, match=r"after 1 retry \(retry 1: minibatch eigenvalues \[-.*scale raised"):
        li.s_test(linear, concave, loader(x, y, 100), test, allow_negative_curvature=True, max_retries=1, **options)
    with pytest.warns(UserWarning, match="Raised to"):  # the check raises damping above |lambda_min| instead
        result = li.s_test(linear, concave, loader(x, y, 100), test, **options)
    assert result.info.damping > -result.info.eigenvalue_min > 0 and torch.isfinite(result.vectors).all()


def test_a_truncated_solve_is_not_converged_and_an_easy_one_stops_early(sgd_mlp):
    model, x, y, test = sgd_mlp
    train = loader(x, y, 100)
    truncated = li.s_test(model, cross_entropy_per_example, train, test, depth=5, refine=False)
    assert not truncated.info.converged and truncated.info.residual > truncated.info.residual_tol
    easy = li.s_test(model, cross_entropy_per_example, train, test, damping=1.0, batch_size=500, depth=1000,
                     check_every=20, route="recursion")
    assert easy.info.converged and easy.info.residual <= easy.info.residual_tol
    assert easy.info.iterations < 1000 and easy.info.iterations % 20 == 0  # stopped at a check
