"""The extension points: solver and curvature registries, the problem config every entry point accepts, and the
functional API's warning when a solve did not converge."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import LogisticRegression, SmallCNN, cross_entropy_per_example, digits, fit_adam, loader

import lightning_influence as li
from lightning_influence.config import resolve_problem, solver_names
from lightning_influence.core.curvature import CURVATURE_TYPES, GaussNewton, Hessian, make_curvature
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers import SOLVER_CLASSES, OneProcess, make_solver, solver_type
from lightning_influence.core.solvers.cg import CGSolver
from lightning_influence.core.solvers.lissa import LissaSolver


def test_every_built_in_solver_is_registered_with_its_split():
    assert set(solver_names()) >= {"lissa", "cg", "exact", "lowrank"}
    splits = {cls.name: cls.split for cls in SOLVER_CLASSES.values()}
    assert splits["lissa"] == "repeats" and splits["cg"] == "points"
    assert splits["exact"] == splits["lowrank"] == "whole"
    assert solver_type(li.LissaConfig()) is LissaSolver and solver_type(li.CGConfig()) is CGSolver
    assert LissaSolver.progress_steps(li.LissaConfig(depth=10, repeats=5), OneProcess()) == 50


def test_curvatures_declare_what_damping_and_storage_ask():
    assert set(CURVATURE_TYPES) >= {"gauss_newton", "hessian"}
    assert GaussNewton.psd and GaussNewton.storable and not Hessian.psd and not Hessian.storable
    assert isinstance(make_curvature("hessian"), Hessian)
    with pytest.raises(ValueError, match="Expected `curvature`"):
        make_curvature("fisher_of_nothing")


def test_registering_bad_solvers_says_what_is_expected():
    @dataclasses.dataclass(frozen=True)
    class Options:
        steps: int = 1

    with pytest.raises(TypeError, match="subclass of Solver"):
        li.register_solver("not_a_solver", Options, object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        li.register_solver("lissa", Options, LissaSolver)
    with pytest.raises(TypeError, match="registered solver config"):
        make_solver(Options(), None)  # type: ignore[arg-type]


def test_problem_config_validates_once_and_resolves_flat_arguments():
    setup = li.ProblemConfig(solver="cg", damping=1e-3, parameters=["a", "b"], dtype="float64")
    assert isinstance(setup.solver, li.CGConfig) and setup.parameters == ("a", "b")
    for bad in ({"damping": -1.0}, {"curvature": "nope"}, {"solver": "nope"}, {"weight_decay": -0.1},
                {"dtype": "int8"}, {"parameters": []}):
        with pytest.raises(ValueError, match="Expected"):
            li.ProblemConfig(**bad)
    assert resolve_problem(None, "exact", 0.5, "hessian") == li.ProblemConfig("exact", "hessian", 0.5)
    assert resolve_problem(setup) is setup
    with pytest.raises(ValueError, match=r"\['curvature', 'depth'\] beside `problem`"):
        resolve_problem(setup, curvature="hessian", solver_options={"depth": 3})


def test_the_old_problem_signature_still_works_with_a_deprecation_warning():
    x, y = digits()
    model = LogisticRegression().double()
    with pytest.warns(DeprecationWarning, match="ProblemConfig"):
        old = InfluenceProblem(model, cross_entropy_per_example, loader(x[:64], y[:64]), 0.1, li.CGConfig())
    new = InfluenceProblem(model, cross_entropy_per_example, loader(x[:64], y[:64]),
                           li.ProblemConfig(solver=li.CGConfig(), damping=0.1))
    assert old.settings == new.settings and old.damping == new.damping == 0.1


def test_functional_api_warns_once_when_the_solve_did_not_converge():
    torch.manual_seed(0)
    x, y = digits()
    model = SmallCNN().double()
    fit_adam(model, x[:200], y[:200], 0.0, epochs=5)  # a few epochs of Adam, no weight decay: not converged
    train, test = loader(x[:200], y[:200], 50), (x[1500:1504], y[1500:1504])
    short = li.LissaConfig(depth=3, check_every=0, refine=False)  # far too few steps, no CG finish
    with pytest.warns(UserWarning, match=r"li.influence: the lissa solve of s_test did not converge \(residual"):
        li.influence(model, cross_entropy_per_example, train, test, solver=short)
    with pytest.warns(UserWarning, match="li.s_test.*did not converge") as caught:
        result = li.s_test(model, cross_entropy_per_example, train, test, solver=short)
    assert not result.info.converged and result.info.residual > result.info.residual_tol
    assert sum("did not converge" in str(w.message) for w in caught) == 1  # once per call, not per point
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged solve says nothing
        converged = li.s_test(model, cross_entropy_per_example, train, test, solver=li.CGConfig(tol=1e-6))
    assert converged.info.converged


def test_functional_api_takes_one_problem_config_and_refuses_flat_arguments_beside_it():
    x, y = digits()
    model = LogisticRegression().double()
    train, test = loader(x[:64], y[:64], 32), (x[1500:1502], y[1500:1502])
    setup = li.ProblemConfig(solver="exact", damping=0.1)
    expected = li.influence(model, cross_entropy_per_example, train, test, solver="exact", damping=0.1)
    torch.testing.assert_close(li.influence(model, cross_entropy_per_example, train, test, problem=setup), expected)
    with pytest.raises(TypeError, match=r"\['damping'\] beside `problem`"):
        li.s_test(model, cross_entropy_per_example, train, test, problem=setup, damping=0.5)
