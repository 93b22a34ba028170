"""Report views added from outside the package: ``register_view(name, view)``.

A view is ``view(writer, report) -> None``: it reads an :class:`~lightning_influence.reporting.InfluenceReport`
and writes what it wants through ``writer`` (a ``SummaryWriter``; events go at ``report.global_step``). Every
registered view runs after the built-in TensorBoard output, on rank 0, for the callback and the command line
alike; a failing view warns and the rest of the output is written. See docs/extending.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

#: ``(writer, report) -> None`` of every registered view, by name.
REPORT_VIEWS: dict[str, Callable[[Any, Any], None]] = {}


def register_view(name: str, view: Callable[[Any, Any], None]) -> None:
    """Run ``view(writer, report)`` for every influence report published from now on (``name`` replaces a view
    registered under the same name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected `name` to be a non-empty string, but got {name!r}.")
    if not callable(view):
        raise TypeError(f"Expected `view` to be a callable (writer, report) -> None, but got {view!r}.")
    REPORT_VIEWS[name] = view


def write_views(writer: Any, report: Any) -> None:
    """Run every registered view; one that raises warns (naming it) and the others still run."""
    for name, view in REPORT_VIEWS.items():
        try:
            view(writer, report)
        except Exception as err:  # noqa: BLE001 - a user's view must not cost the built-in outputs
            warnings.warn(f"Report view {name!r} failed and was skipped: {type(err).__name__}: {err}", stacklevel=2)
