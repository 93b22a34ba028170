"""LiSSA's step batch rule (``LissaConfig.shrink_batch``): the recursion's minibatch size of least predicted work.

A recursion step costs about ``b`` examples' curvature products, and the steps the series needs follow
``scale_b / damping`` (:func:`~lightning_influence.core.solvers.neumann.series_steps`), with ``scale_b`` the
``scale="auto"`` estimate on minibatches of ``b`` examples. Each ``LISSA_STEP_BATCHES`` size below ``batch_size`` has
its scale probed, and the size of least ``series_steps(scale_b) x b`` is kept.
"""

from __future__ import annotations

from typing import Any

from lightning_influence.config import LISSA_STEP_BATCHES
from lightning_influence.core.solvers.neumann import series_steps


def shrink_applies(solver: Any) -> bool:
    """Whether the rule probes smaller minibatches for ``solver`` (a LiSSA solver): ``shrink_batch`` with
    ``scale="auto"``, a positive damping, a positive semi-definite curvature, no preconditioner, and a training set
    larger than the check subset (on smaller ones the solve is cheap or routed to conjugate gradient: unchanged)."""
    config, problem = solver.config, solver.problem
    return bool(config.shrink_batch and config.scale == "auto" and not solver.preconditioned and problem.damping > 0
                and problem.curvature.psd and not problem.check_is_whole()
                and any(b < config.batch_size for b in LISSA_STEP_BATCHES))


def choose_step_batch(solver: Any) -> tuple[int, float, dict[int, float]]:
    """``(size, its scale, every probed scale)``: ``batch_size`` (its scale the solver's own estimate) and each
    ``LISSA_STEP_BATCHES`` size below it probed, the one of least predicted example products kept (a tie keeps the
    larger size). Deterministic (seeded probes): every rank picks the same."""
    config, damping = solver.config, solver.problem.damping
    probed = {config.batch_size: solver.scale}
    for size in sorted((b for b in LISSA_STEP_BATCHES if b < config.batch_size), reverse=True):
        probed[size] = solver.estimate_scale(batch_size=size)
    best = min(probed, key=lambda b: (series_steps(probed[b], damping, config.residual_tol) * b, -b))
    return best, probed[best], probed
