"""LiSSA's conjugate-gradient finish (``refine``) and the hand-off to it when the series cannot finish in time."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy_per_example, digits, loader
from torch import nn

import lightning_influence as li
from lightning_influence.config import ExactConfig, LissaConfig
from lightning_influence.core import InfluenceProblem
from lightning_influence.core.solvers.neumann import HAND_OFF_FACTOR, cannot_finish, recursion_costs_more
from lightning_influence.core.tensors.modes import analysis_mode


def test_cannot_finish_projects_the_rate_of_the_last_two_checks():
    depth, tol = 1000, 0.05
    assert not cannot_finish([(50, 0.5)], depth, tol)  # one check: no rate yet
    assert cannot_finish([(50, 0.5), (100, 0.6)], depth, tol)  # stopped improving
    # halving every 50 steps: 0.05 is ~3.3 halvings away from 0.5 at step 100, well inside the depth
    assert not cannot_finish([(50, 1.0), (100, 0.5)], depth, tol)
    # 1% less every 50 steps: ~11,500 more steps, far beyond HAND_OFF_FACTOR x depth
    assert cannot_finish([(50, 0.5), (100, 0.495)], depth, tol)
    # the boundary: a rate that meets tol a step before HAND_OFF_FACTOR x depth runs on, a step after hands off
    for steps_left, expected in ((HAND_OFF_FACTOR * depth - 100 - 1, False), (HAND_OFF_FACTOR * depth - 100 + 1, True)):
        rate = (tol / 0.5) ** (1.0 / steps_left)
        assert cannot_finish([(50, 0.5 / rate**50), (100, 0.5)], depth, tol) is expected


def _small_damping_problem():
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # a few hundred full-batch Adam steps: fitted, not converged
        optimizer.zero_grad()
        cross_entropy_per_example(model, (x[:300], y[:300])).mean().backward()
        optimizer.step()
    return model, loader(x[:300], y[:300]), (x[1500:1504], y[1500:1504])


def test_at_a_small_damping_the_series_hands_off_to_cg_and_the_answer_converges():
    model, train, test = _small_damping_problem()
    options = {"damping": 1e-3, "depth": 600, "batch_size": 32, "route": "recursion"}  # the series, then CG
    exact = li.s_test(model, cross_entropy_per_example, train, test, solver="exact", damping=1e-3).vectors
    with pytest.warns(UserWarning, match="did not converge"):
        plain = li.s_test(model, cross_entropy_per_example, train, test, refine=False, **options).info
    refined = li.s_test(model, cross_entropy_per_example, train, test, **options)
    info = refined.info
    # without the finish the series runs every step and still misses the tolerance: the case the hand-off is for
    assert plain.iterations == 600 and not plain.converged
    # with it the series stops early (its checks project a miss), CG finishes and the residual check passes
    assert info.iterations < 600 and info.settings["refined_iterations"] > 0
    assert info.converged and info.residual <= info.residual_tol
    cosine = torch.nn.functional.cosine_similarity(refined.vectors, exact, dim=1)
    assert (cosine > 0.99).all()


def test_the_verdict_is_measured_over_the_whole_training_set_not_the_check_subset():
    model, train, test = _small_damping_problem()
    with analysis_mode(model):
        exact = InfluenceProblem(model, cross_entropy_per_example, train, 1e-3, ExactConfig(), subset_examples=50)
        vectors = exact.gradients(test)
        x = exact.solve(vectors).vectors
        # the exact solution of the whole-set system: the verdict sees it solved, a 50-example subset cannot
        assert exact.residual(x, vectors).max() < 1e-4 and exact.residual_examples() == 300
        assert exact.check_residual(x, vectors).max() > 0.05
        # LiSSA's repeats check the cheap subset, whose residual levels off at its sampling error: that trend is no
        # reason to hand off (the series draws from every example), so the repeat runs its depth; the verdict is
        # the whole-set residual, and the answer agrees with the exact one
        config = LissaConfig(depth=600, batch_size=32, route="recursion")
        lissa = InfluenceProblem(model, cross_entropy_per_example, train, 1e-3, config, subset_examples=50)
        found = lissa.solve(vectors)
    assert found.info.iterations == 600
    assert found.info.converged and found.info.residual == pytest.approx(float(lissa.residual(found.vectors,
                                                                                                vectors).max()))
    assert (torch.nn.functional.cosine_similarity(found.vectors, x, dim=1) > 0.99).all()


def test_the_predicted_costs_send_small_sets_at_small_dampings_to_cg_and_large_sets_to_the_series():
    # scale 1.5 (top eigenvalue 1), damping 0.01: the series needs ceil(150 ln 20) = 450 steps, CG's bound
    # ceil(0.5 sqrt(100) ln 200) = 27 passes
    dearer, steps, iterations = recursion_costs_more(1.5, 0.01, 128, 1400, 0.05, 0.01)
    assert (steps, iterations) == (450, 27) and dearer  # 57,600 example products against 37,800
    assert not recursion_costs_more(1.5, 0.01, 128, 20_000, 0.05, 0.01)[0]  # 57,600 against 540,000
    assert not recursion_costs_more(1.5, 1.0, 128, 1400, 0.05, 0.01)[0]  # a large damping: 5 steps


def test_the_series_prediction_counts_its_early_stop_checks_and_stops_only_at_one():
    # the digits example at damping="auto" (scale 1.5, damping 0.0275, 1,400 examples): 164 steps predicted, CG's
    # bound 16 passes (22,400 products). Steps alone (20,992) look cheaper, but the series stops only at a check:
    # 200 steps (25,600) and four checks of the whole set (5,600), so CG is the cheaper solve
    assert not recursion_costs_more(1.5, 0.0275, 128, 1400, 0.05, 0.01)[0]
    dearer, steps, iterations = recursion_costs_more(1.5, 0.0275, 128, 1400, 0.05, 0.01, check_every=50,
                                                     check_work=1400)
    assert dearer and (steps, iterations) == (164, 16)  # the predicted steps themselves are not rounded
    # on 20,000 examples the checks read the 2,048-example subset and the series stays far cheaper
    assert not recursion_costs_more(1.5, 0.0275, 128, 20_000, 0.05, 0.01, check_every=50, check_work=2048)[0]


def test_the_auto_route_solves_by_cg_where_it_is_predicted_cheaper_and_agrees_with_the_series():
    model, train, test = _small_damping_problem()
    options = {"damping": 1e-3, "depth": 600, "batch_size": 32}
    exact = li.s_test(model, cross_entropy_per_example, train, test, solver="exact", damping=1e-3).vectors
    routed = li.s_test(model, cross_entropy_per_example, train, test, **options)
    info = routed.info
    # 300 examples at damping 1e-3: CG's passes cost less than the series' steps; no step of the series ran
    assert info.solver == "lissa" and info.settings["solved_by"] == "cg" and info.iterations == 0
    assert info.settings["predicted_steps"] * 32 > info.settings["predicted_cg_iterations"] * 300
    # the trace is CG's residual per step (TensorBoard tags it as CG's): it ends below CG's tolerance
    assert info.trace.shape == (1, info.settings["refined_iterations"]) and float(info.trace[0, -1]) <= 0.01
    assert info.converged and info.residual <= info.residual_tol
    assert (torch.nn.functional.cosine_similarity(routed.vectors, exact, dim=1) > 0.99).all()
    series = li.s_test(model, cross_entropy_per_example, train, test, route="recursion", **options)
    assert series.info.iterations > 0 and "solved_by" not in series.info.settings
    assert (torch.nn.functional.cosine_similarity(series.vectors, exact, dim=1) > 0.99).all()
    # a large damping with frequent checks makes the series cheap: it runs (5 predicted steps; with the default
    # check every 50 steps it could stop no earlier than step 50, dearer than CG's 3 passes over 300 examples)
    cheap = li.s_test(model, cross_entropy_per_example, train, test, damping=1.0, depth=600, batch_size=32,
                      check_every=5).info
    assert cheap.iterations > 0 and "solved_by" not in cheap.settings


def test_with_a_subset_check_the_series_stops_once_the_whole_set_verdict_is_met():
    model, train, test = _small_damping_problem()
    with analysis_mode(model):
        exact = InfluenceProblem(model, cross_entropy_per_example, train, 0.05, ExactConfig(), subset_examples=50)
        vectors = exact.gradients(test)
        x = exact.solve(vectors).vectors
        # the 50-example subset's own sampling error keeps its check above the tolerance even at the exact answer
        assert exact.check_residual(x, vectors).max() > 0.05
        config = LissaConfig(depth=3000, batch_size=32, route="recursion")
        lissa = InfluenceProblem(model, cross_entropy_per_example, train, 0.05, config, subset_examples=50)
        found = lissa.solve(vectors)
        predicted = recursion_costs_more(lissa.solver.scale, 0.05, 32, 300, 0.05, 0.01)[1]
    # from the predicted steps on, the whole-set verdict is asked at the checks: met well before the depth
    assert predicted <= found.info.iterations < 3000 and found.info.iterations % 50 == 0
    assert found.info.converged and found.info.residual <= 0.05
    assert (torch.nn.functional.cosine_similarity(found.vectors, x, dim=1) > 0.99).all()
