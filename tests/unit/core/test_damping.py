"""damping='auto' from the curvature's spectrum, and the Hessian's negative-curvature check."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy_per_example, digits, loader
from torch import nn

from lightning_influence import config as defaults
from lightning_influence.config import ExactConfig, LissaConfig
from lightning_influence.core.curvature.damping import Spectrum, choose_damping, optimizer_weight_decay
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode


@pytest.fixture(scope="module")
def sgd_mlp():
    """A tanh MLP after 2 SGD epochs (lr 0.3): not converged, its Hessian is indefinite."""
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    x, y = x[:300].flatten(1) * 16, y[:300]  # raw pixels: strong negative curvature
    model = nn.Sequential(nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=1e-3)
    for _ in range(2):
        for idx in torch.randperm(300).split(32):
            optimizer.zero_grad()
            cross_entropy_per_example(model, (x[idx], y[idx])).mean().backward()
            optimizer.step()
    return model, loader(x, y, 100)


def _exact_spectrum(model, train, curvature):
    problem = InfluenceProblem(model, cross_entropy_per_example, train, 0.0, ExactConfig(), curvature=curvature,
                               allow_negative_curvature=True)
    with analysis_mode(model):
        w, _ = problem.curvature_eigh()
    return float(w[0]), float(w[-1])


def test_auto_damping_is_a_small_fraction_of_the_top_eigenvalue_and_at_least_the_weight_decay(sgd_mlp):
    model, train = sgd_mlp
    _, top = _exact_spectrum(model, train, "gauss_newton")
    for weight_decay in (None, 1e-4, 10.0):
        problem = InfluenceProblem(model, cross_entropy_per_example, train, "auto", LissaConfig(),
                                   weight_decay=weight_decay)
        with analysis_mode(model):
            damping = problem.damping
        assert 0 < damping <= 0.1 * top * (1 + 1e-9)  # Lanczos: a lower bound of the top eigenvalue
        if weight_decay is not None and weight_decay <= 0.1 * top:
            assert damping >= weight_decay
        choice = problem.damping_choice()
        assert choice.requested == "auto" and choice.spectrum is not None
        assert choice.spectrum.top == pytest.approx(top, rel=1e-3)  # Lanczos finds the top eigenvalue
        if weight_decay is None:
            assert damping == pytest.approx(defaults.AUTO_DAMPING_FRACTION * choice.spectrum.top)
        if weight_decay == 10.0:  # a weight decay above the cap: capped, and said so
            assert "capped" in choice.rule and damping == pytest.approx(0.1 * choice.spectrum.top)


def test_a_given_damping_is_used_as_given_without_a_spectrum(sgd_mlp):
    model, train = sgd_mlp
    problem = InfluenceProblem(model, cross_entropy_per_example, train, 0.0123, LissaConfig())
    calls = []
    problem.spectrum = lambda: calls.append(1)  # type: ignore[method-assign]
    assert problem.damping == 0.0123 and problem.damping_choice().rule == "given" and not calls


def test_hessian_damping_below_negative_curvature_is_raised_with_a_warning(sgd_mlp):
    model, train = sgd_mlp
    bottom, _ = _exact_spectrum(model, train, "hessian")
    assert bottom < -0.05  # the premise: strongly indefinite
    problem = InfluenceProblem(model, cross_entropy_per_example, train, 1e-3, ExactConfig(), curvature="hessian")
    with analysis_mode(model), pytest.warns(UserWarning, match="below \\|lambda_min\\|.*Raised to"):
        result = problem.solve(problem.gradients(next(iter(train))))
    info = result.info
    # solver='exact' checks against the exact eigenvalues: raised to 1.25 |lambda_min|
    assert info.damping == pytest.approx(defaults.NEGATIVE_CURVATURE_MARGIN * -bottom)
    assert info.converged and info.curvature == "hessian" and info.eigenvalue_min == pytest.approx(bottom)
    assert info.warnings and "Raised" in info.warnings[0] and "raised" in info.damping_rule
    insist = InfluenceProblem(model, cross_entropy_per_example, train, 1e-3, LissaConfig(), curvature="hessian",
                              allow_negative_curvature=True)
    with analysis_mode(model), pytest.warns(UserWarning, match="allow_negative_curvature=True"):
        assert insist.damping == 1e-3


def test_choose_damping_rules_without_a_model():
    spectrum = Spectrum(top=2.0, bottom=-0.5, steps=10, examples=100)
    assert choose_damping("auto", "gauss_newton", lambda: spectrum).value == pytest.approx(2 * defaults.AUTO_DAMPING_FRACTION)
    assert choose_damping("auto", "gauss_newton", lambda: spectrum, weight_decay=0.15).value == 0.15
    assert choose_damping(0.3, "gauss_newton", lambda: 1 / 0).value == 0.3  # spectrum never asked for
    with pytest.warns(UserWarning):
        assert choose_damping(0.3, "hessian", lambda: spectrum).value == pytest.approx(0.625)
    with pytest.raises(ValueError, match="Expected `damping`"):
        choose_damping(-1.0, "gauss_newton", lambda: spectrum)
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], weight_decay=0.02)
    assert optimizer_weight_decay(optimizer) == 0.02
    assert optimizer_weight_decay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) is None
