"""Markdown tables for TensorBoard's text plugin (and anywhere else markdown is read)."""

from __future__ import annotations

from typing import Any

from lightning_influence.reporting._format import (
    MISSING,
    SIGN_CONVENTION,
    format_float,
    format_influence,
    format_top,
    format_value,
    input_text,
    mislabel_row,
    picture_note,
    point_heading,
    solver_line,
    timings_line,
)
from lightning_influence.results import (
    ExplainedPoint,
    InfluenceReport,
    MislabelReport,
    SolveInfo,
)

POINT_COLUMNS = ("role", "dataset index", "label", "prediction", "loss", "influence")
SUMMARY_COLUMNS = (
    "val index",
    "label",
    "prediction",
    "loss",
    "top harmful (influence)",
    "top helpful (influence)",
)
MISLABEL_COLUMNS = (
    "rank",
    "dataset index",
    "given label",
    "prediction",
    "self-influence",
    "training loss",
    "loss rank (baseline)",
)
SELF_INFLUENCE_NOTE = (
    "Self-influence I(z, z) = -g^T (H + damping I)^-1 g is <= 0; a larger |I(z, z)| means the model had to bend "
    "more to fit the example, the classic mislabel signal. Loss rank 1 = highest training loss (the plain "
    "baseline)."
)
REMOVAL_NOTE = "Removing a training example changes the validation loss by about -influence / n."


def point_markdown(point: ExplainedPoint, solver: SolveInfo) -> str:
    """Markdown table of one validation point and its top harmful and helpful training examples.

    Args:
        point: the explained validation point.
        solver: how its s_test was solved (named in the header line).

    Returns:
        A header line, the sign convention and a table with one row for the validation example, then
        ``harmful #1..`` and ``helpful #1..`` (strongest first). An ``example`` column holds the
        ``example_formatter`` text or, without one, a non-image input's values (token ids, tabular row);
        when the inputs are not all images a closing line says that no image grid is drawn, and why.
    """
    rows = [
        [
            "validation",
            str(point.val_index),
            *_example_cells(point.label, point.prediction, point.loss),
            MISSING,
        ]
    ]
    texts = [_example_text(point.text, point.input)]
    inputs = [point.input]
    for role, influencers in (("harmful", point.harmful), ("helpful", point.helpful)):
        for rank, influencer in enumerate(influencers, start=1):
            cells = _example_cells(influencer.label, influencer.prediction, influencer.loss)
            rows.append(
                [
                    f"{role} #{rank}",
                    str(influencer.train_index),
                    *cells,
                    format_influence(influencer.influence),
                ]
            )
            texts.append(_example_text(influencer.text, influencer.input))
            inputs.append(influencer.input)
    columns, rows = _with_examples(POINT_COLUMNS, rows, texts)
    lines = [
        f"**{_capitalise(point_heading(point))}**; {solver_line(solver)}.",
        "",
        f"Sign convention: {SIGN_CONVENTION}.",
        "",
        _table(columns, rows),
    ]
    note = picture_note(inputs)
    return "\n".join(lines if note is None else [*lines, "", f"_{note}_"])


def _example_text(text: str | None, x: Any) -> str | None:
    """The ``example`` cell: the user's ``example_formatter`` text, else a non-image input's values."""
    return text if text is not None else input_text(x)


def _with_examples(
    columns: tuple[str, ...], rows: list[list[str]], texts: list[str | None]
) -> tuple[tuple[str, ...], list[list[str]]]:
    """Add the ``example`` column when any row has an example text (formatter, token ids, tabular values)."""
    if all(text is None for text in texts):
        return columns, rows
    return (*columns, "example"), [[*row, _short_text(text)] for row, text in zip(rows, texts)]


def report_markdown(report: InfluenceReport) -> str:
    """Markdown summary of a whole report: one row per monitored point, solver settings and timings.

    Args:
        report: the analysis results at one epoch / global step.

    Returns:
        Markdown with a heading, the solver and timing lines, the sign convention and the summary table.
    """
    rows = [
        [
            str(point.val_index),
            *_example_cells(point.label, point.prediction, point.loss),
            format_top(point.harmful),
            format_top(point.helpful),
        ]
        for point in report.points
    ]
    lines = [
        (
            f"**Influence report**: epoch {report.epoch}, global step {report.global_step}, stage "
            f"`{report.stage}`, {report.train_size} training examples, {len(report.points)} monitored points."
        ),
        "",
        f"- s_test: {solver_line(report.solver)}.",
        f"- Solver settings: {_settings_text(report.solver.settings)}.",
        f"- Timings: {timings_line(report.timings)}.",
        f"- Sign convention: {SIGN_CONVENTION}. {REMOVAL_NOTE}",
        "",
        _table(SUMMARY_COLUMNS, rows) if rows else "_No monitored points._",
    ]
    return "\n".join(lines)


def mislabel_markdown(report: MislabelReport) -> str:
    """Markdown table of the mislabel candidates, strongest ``|I(z, z)|`` first, beside the loss baseline.

    Args:
        report: the mislabel analysis at one epoch / global step.

    Returns:
        Markdown with a heading, the solver line (solver, damping, settings, time), what the score means, a
        sentence on where the self-influence and training-loss rankings agree, and the table
        ``rank | dataset index | given label | prediction | self-influence | training loss | loss rank``
        (plus ``example`` and a no-grid line for non-image inputs, as in :func:`point_markdown`).
    """
    rows = [
        mislabel_row(rank, candidate)
        for rank, candidate in enumerate(report.candidates, start=1)
    ]
    texts = [_example_text(candidate.text, candidate.input) for candidate in report.candidates]
    columns, rows = _with_examples(MISLABEL_COLUMNS, rows, texts)
    note = picture_note([candidate.input for candidate in report.candidates]) if report.candidates else None
    solver = report.solver
    lines = [
        (
            f"**Mislabel candidates**: epoch {report.epoch}, global step {report.global_step}, top "
            f"{len(report.candidates)} of {report.train_size} training examples by |I(z, z)|."
        ),
        "",
        (
            f"- Self-influence: solver {solver.solver}, damping {format_float(solver.damping, 3)}, settings "
            f"{_settings_text(solver.settings)}, {format_float(report.seconds, 3)} s."
        ),
        f"- {SELF_INFLUENCE_NOTE}",
        f"- {mislabel_agreement(report)}",
        "",
        _table(columns, rows) if rows else "_No candidates._",
    ]
    return "\n".join(lines if note is None else [*lines, "", f"_{note}_"])


def mislabel_agreement(report: MislabelReport) -> str:
    """A sentence on where the self-influence and training-loss rankings agree among the candidates.

    Example:
        ``"3 of the top 5 by self-influence are also in the top 5 by training loss."``
    """
    top = len(report.candidates)
    if top == 0:
        return "No candidates to compare with the training-loss ranking."
    shared = sum(1 for candidate in report.candidates if candidate.loss_rank < top)
    return f"{shared} of the top {top} by self-influence are also in the top {top} by training loss."


def _short_text(text: str | None, limit: int = 120) -> str:
    if text is None:
        return MISSING
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _example_cells(label: Any, prediction: Any, loss: float | None) -> list[str]:
    return [format_value(label), format_value(prediction), format_float(loss)]


def _settings_text(settings: dict[str, Any]) -> str:
    if not settings:
        return MISSING
    return ", ".join(f"`{key}={format_value(value)}`" for key, value in settings.items())


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside cells is escaped."""
    lines = [_row(columns), _row(["---"] * len(columns))]
    lines.extend(_row(row) for row in rows)
    return "\n".join(lines)


def _row(cells: Any) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]
