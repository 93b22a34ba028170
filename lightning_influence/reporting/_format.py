"""Shared formatting helpers: record values as short text and as JSON-serialisable builtins."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_influence.results import ExplainedPoint, Influencer, MislabelCandidate, SolveInfo

SIGN_CONVENTION = (
    "positive = harmful (up-weighting the training example raises the validation loss); negative = helpful"
)
"""The package's sign convention, stated verbatim in every output."""

MISSING = "-"


def to_builtin(value: Any) -> Any:
    """Convert ``value`` to JSON-serialisable builtins.

    Tensors become numbers (one element) or nested lists, non-finite floats become None, containers are
    converted recursively, and anything else unknown becomes its ``str``.

    Example:
        >>> to_builtin({"label": torch.tensor(3), "loss": float("nan"), "tags": ("a", 1)})
        {'label': 3, 'loss': None, 'tags': ['a', 1]}
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_builtin(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): to_builtin(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(item) for item in value]
    if hasattr(value, "item"):  # numpy scalars
        return to_builtin(value.item())
    return str(value)


def format_float(value: float | None, digits: int = 4) -> str:
    """Format a float with ``digits`` significant digits; ``-`` for None."""
    if value is None:
        return MISSING
    return f"{float(value):.{digits}g}"


def format_influence(value: float) -> str:
    """Format an influence with an explicit sign, e.g. ``+1.23e-02``."""
    return f"{float(value):+.2e}"


def format_value(value: Any) -> str:
    """Format a label or prediction (int, str, float, tensor) as short text; ``-`` for None."""
    if value is None:
        return MISSING
    value = to_builtin(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, list):
        text = ", ".join(format_value(item) for item in value[:8])
        return f"[{text}{', ...' if len(value) > 8 else ''}]"
    return str(value)


def mislabel_row(rank: int, candidate: MislabelCandidate) -> list[str]:
    """One candidate as displayed in tables: rank, index, label, prediction, I(z, z), loss, 1-based loss rank."""
    return [
        str(rank),
        str(candidate.train_index),
        format_value(candidate.label),
        format_value(candidate.prediction),
        format_influence(candidate.self_influence),
        format_float(candidate.loss),
        str(candidate.loss_rank + 1),
    ]


def format_top(influencers: tuple[Influencer, ...]) -> str:
    """Format the strongest influencer as ``#index (+1.23e-02)``, or ``-`` when there is none."""
    if not influencers:
        return MISSING
    top = influencers[0]
    return f"#{top.train_index} ({format_influence(top.influence)})"


def point_heading(point: ExplainedPoint) -> str:
    """One-line description of a validation point: index, label, prediction and loss."""
    return (
        f"validation #{point.val_index}: label {format_value(point.label)}, "
        f"prediction {format_value(point.prediction)}, loss {format_float(point.loss)}"
    )


def solver_line(solver: SolveInfo) -> str:
    """One-line description of how s_test was solved: solver, damping, scale, convergence, time."""
    return (
        f"solver {solver.solver} on {solver.curvature or 'hessian'}, damping {format_float(solver.damping, 3)}"
        f"{f' ({solver.damping_requested})' if solver.damping_requested == 'auto' else ''}, "
        f"scale {format_float(solver.scale, 3)}, {status_word(solver)}, {format_float(solver.seconds, 3)} s"
    )


def status_word(solver: SolveInfo) -> str:
    """The one status word every output uses: ``converged`` only when the solver's own residual check met its
    tolerance, else ``NOT converged (unreliable)``, with the residual when one was measured."""
    residual = "" if solver.residual is None else f", residual {format_float(solver.residual, 2)}"
    limit = "" if solver.residual_tol is None else f" (tolerance {format_float(solver.residual_tol, 2)})"
    if solver.converged:
        return f"converged{residual}{limit}"
    return f"NOT converged{residual}{limit}: unreliable"


def timings_line(timings: dict[str, float]) -> str:
    """``s_test 1.2 s, scoring 3.4 s`` (or ``-`` when there are no timings)."""
    if not timings:
        return MISSING
    return ", ".join(f"{key} {format_float(seconds, 3)} s" for key, seconds in timings.items())
