"""A rich console table: one row per monitored validation point, with its strongest influencers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lightning_influence.reporting._format import (
    format_float,
    format_top,
    format_value,
    solver_line,
    timings_line,
)
from lightning_influence.reporting.records import InfluenceReport


def summary_table(report: InfluenceReport) -> Table:
    """Build a rich table summarising ``report``.

    Columns: validation index, label, prediction, loss, top harmful ``#index (influence)`` and top helpful
    ``#index (influence)``; the caption names the solver, damping, scale, timings and sign convention.
    """
    table = Table(
        title=f"Influence at epoch {report.epoch}, step {report.global_step} ({report.stage})",
        caption=(
            f"{solver_line(report.solver)}; timings: {timings_line(report.timings)}\n"
            "positive influence = harmful, negative = helpful"
        ),
    )
    table.add_column("val idx", justify="right")
    table.add_column("label", justify="right")
    table.add_column("pred", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("top harmful (I)", style="red")
    table.add_column("top helpful (I)", style="green")
    for point in report.points:
        table.add_row(
            str(point.val_index),
            format_value(point.label),
            format_value(point.prediction),
            format_float(point.loss),
            format_top(point.harmful),
            format_top(point.helpful),
        )
    return table


def print_summary(report: InfluenceReport, console: Console | None = None) -> None:
    """Print :func:`summary_table` of ``report`` to ``console`` (a new ``rich.console.Console`` if None)."""
    (console if console is not None else Console()).print(summary_table(report))
