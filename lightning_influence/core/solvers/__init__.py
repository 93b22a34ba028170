"""Inverse-curvature solvers: one object per solver behind one protocol (:class:`Solver`), and their registry.

A solver is registered once with its config class: ``register_solver("name", NameConfig, NameSolver)`` makes
``solver="name"`` and ``NameConfig(...)`` work in every entry point (the callback, the functional API,
``correct_errors``, the command line). See docs/extending.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_influence.config import CGConfig, ExactConfig, LissaConfig, LowRankConfig, register_solver_config
from lightning_influence.core.solvers.base import ONE_PROCESS, SPLITS, OneProcess, Ranks, Solver
from lightning_influence.core.solvers.cg import CGSolver
from lightning_influence.core.solvers.exact import ExactSolver
from lightning_influence.core.solvers.lissa import LissaSolver
from lightning_influence.core.solvers.lowrank import LowRankSolver

if TYPE_CHECKING:
    from lightning_influence.core.problem import InfluenceProblem

#: Solver class of each registered config class.
SOLVER_CLASSES: dict[type, type[Solver]] = {}


def register_solver(name: str, config_type: type, solver_type: type[Solver]) -> None:
    """Make ``solver=name`` (with ``config_type``'s fields as options) and ``config_type(...)`` solve with
    ``solver_type``. ``config_type`` is a frozen dataclass that validates itself in ``__post_init__``."""
    if not (isinstance(solver_type, type) and issubclass(solver_type, Solver)):
        raise TypeError(f"Expected `solver_type` to be a subclass of Solver, but got {solver_type!r}.")
    if solver_type.split not in SPLITS:
        raise ValueError(f"Expected `{solver_type.__name__}.split` to be one of {SPLITS}, but got"
                         f" {solver_type.split!r}.")
    register_solver_config(name, config_type)
    SOLVER_CLASSES[config_type] = solver_type


def solver_type(config: Any) -> type[Solver]:
    """The solver class of ``config`` (a registered config instance)."""
    found = SOLVER_CLASSES.get(type(config))
    if found is None:
        raise TypeError(f"Expected a registered solver config ({', '.join(c.__name__ for c in SOLVER_CLASSES)}),"
                        f" but got {type(config).__name__}. Register it with register_solver(name, config_type,"
                        " solver_type).")
    return found


def make_solver(config: Any, problem: InfluenceProblem) -> Solver:
    """The solver of ``config`` (a registered config instance), bound to ``problem``."""
    return solver_type(config)(config, problem)


register_solver("lissa", LissaConfig, LissaSolver)
register_solver("cg", CGConfig, CGSolver)
register_solver("exact", ExactConfig, ExactSolver)
register_solver("lowrank", LowRankConfig, LowRankSolver)

__all__ = ["ONE_PROCESS", "SOLVER_CLASSES", "OneProcess", "Ranks", "Solver", "make_solver", "register_solver", "solver_type"]
