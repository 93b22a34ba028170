"""Rich console tables: one row per monitored validation point (with its strongest influencers), or one row
per mislabel candidate (with its self-influence and training-loss rank)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lightning_influence.config import MISLABEL_SHOWN
from lightning_influence.reporting._format import (
    format_float,
    format_top,
    format_value,
    mislabel_row,
    solver_line,
    timings_line,
)
from lightning_influence.reporting.tables import mislabel_agreement, ranking_label, ranking_line
from lightning_influence.results import InfluenceReport, MislabelReport

#: Characters of a number in the tables (``-1.65e+00``): such columns are never narrower.
NUMBER_WIDTH = 9


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


def mislabel_table(report: MislabelReport) -> Table:
    """Build a rich table of the mislabel candidates in ``report``, strongest ``|I(z, z)|`` first.

    Columns: rank, train index, given label, prediction, self-influence ``I(z, z)``, training loss and loss
    rank (1 = highest training loss, the baseline); the caption names the solver, damping and time, and
    says how many of the candidates the training-loss ranking also puts on top.
    """
    solver = report.solver
    table = Table(
        title=(
            f"Mislabel candidates at epoch {report.epoch}, step {report.global_step}: top "
            f"{len(report.candidates)} of {report.train_size} by {ranking_label(report)}"
        ),
        caption=(
            f"{ranking_line(report)}\n"
            f"solver {solver.solver}, damping {format_float(solver.damping, 3)}, "
            f"{format_float(report.seconds, 3)} s; {mislabel_agreement(report)}\n"
            "I(z, z) = -g^T (H + damping I)^-1 g <= 0: larger |I| = the model bent more to fit it"
        ),
    )
    signals = report.signals is not None
    columns = {"rank": 4, "train idx": 5, "label": 5, "pred": 4, "I(z, z)": NUMBER_WIDTH, "loss": 6, "loss rank": 4}
    if signals:
        columns.update({"score": 6, "sugg. label": 5})
    for name, width in columns.items():
        # numbers are never cut (80 columns once cut I(z, z) to "-1.65e..."); headers wrap between words instead
        number = name in ("I(z, z)", "loss", "score")
        table.add_column(name, justify="right", style="red" if name == "I(z, z)" else None, no_wrap=number,
                         min_width=width)
    for rank, candidate in enumerate(report.candidates[:MISLABEL_SHOWN], start=1):
        extra = [format_float(candidate.score), format_value(candidate.suggested_label)] if signals else []
        table.add_row(*mislabel_row(rank, candidate), *extra)
    return table


def print_mislabel_summary(report: MislabelReport, console: Console | None = None) -> None:
    """Print :func:`mislabel_table` of ``report`` to ``console`` (a new ``rich.console.Console`` if None)."""
    (console if console is not None else Console()).print(mislabel_table(report))
