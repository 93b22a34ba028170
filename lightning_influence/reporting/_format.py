"""Shared formatting helpers: record values as short text and as JSON-serialisable builtins."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_influence.core.tensors.batching import MAX_KEPT_INPUT_VALUES, looks_like_image
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


MAX_INPUT_VALUES = 16  # values of a non-image input shown in a table cell


def input_text(x: Any) -> str | None:
    """A readable table cell for a non-image input: ``ids 101 2023 2003 ... (32 values)`` for integer inputs
    (token ids), ``0.12 -1.3 0.5 ... (20 values)`` for real ones (tabular rows); None for images and no input.

    Example:
        >>> input_text(torch.tensor([101, 7592, 102]))
        'ids 101 7592 102 (3 values)'
    """
    if not isinstance(x, torch.Tensor) or x.is_complex() or looks_like_image(x):
        return None
    flat = x.detach().cpu().reshape(-1)
    shown = flat[:MAX_INPUT_VALUES].tolist()
    integer = not (flat.is_floating_point() or flat.dtype == torch.bool)
    cells = [str(int(v)) if integer else f"{float(v):.3g}" for v in shown]
    more = " ..." if flat.numel() > MAX_INPUT_VALUES else ""
    shape = f"shape {list(x.shape)}, " if x.ndim > 1 else ""
    return f"{'ids ' if integer else ''}{' '.join(cells)}{more} ({shape}{flat.numel()} values)"


def picture_note(inputs: list[Any]) -> str | None:
    """The sentence a table carries when no image grid is drawn for its examples (None when one is).

    A grid needs every example's input to look like an image; the note says which case stopped it, so a
    missing picture is explained rather than silent.
    """
    if inputs and all(isinstance(x, torch.Tensor) and looks_like_image(x) for x in inputs):
        return None
    other = next((x for x in inputs if isinstance(x, torch.Tensor) and not looks_like_image(x)), None)
    if other is not None:
        return (f"No image grid: the inputs are not images (shape {list(other.shape)}), so the examples are shown "
                "in this table only (`example` column; `InfluenceCallback(example_formatter=...)` renders them "
                "as text).")
    return ("No image grid: the examples' inputs were not kept (inputs are kept when they are images or have at "
            f"most {MAX_KEPT_INPUT_VALUES} values), so the examples are shown in this table only.")
