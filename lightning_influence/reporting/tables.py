"""Markdown tables for TensorBoard's text plugin (and anywhere else markdown is read)."""

from __future__ import annotations

from typing import Any

from lightning_influence.config import MISLABEL_SHOWN, NO_SIGNALS_NOTE
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
from lightning_influence.reporting.relabel import confusion_records
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
    """Markdown table of the mislabel candidates in the report's ranking order, beside the loss baseline.

    Args:
        report: the mislabel analysis at one epoch / global step.

    Returns:
        Markdown with a heading, the solver line (solver, damping, settings, time), what the score means, the
        ranking used (training signals, or what ranking without them costs), a sentence on where the
        self-influence and training-loss rankings agree, and the table
        ``rank | dataset index | given label | prediction | self-influence | training loss | loss rank`` (plus
        ``score`` and ``suggested label`` with training signals, and ``example`` and a no-grid line for
        non-image inputs, as in :func:`point_markdown`) of the first ``MISLABEL_SHOWN`` candidates.
    """
    signals = report.signals is not None
    shown = report.candidates[:MISLABEL_SHOWN]
    rows = [
        mislabel_row(rank, candidate) + ([format_float(candidate.score), format_value(candidate.suggested_label),
                                          "yes" if candidate.flagged else ""] if signals else [])
        for rank, candidate in enumerate(shown, start=1)
    ]
    columns = MISLABEL_COLUMNS + ((f"score ({report.ranking})", "suggested label", "flagged") if signals else ())
    texts = [_example_text(candidate.text, candidate.input) for candidate in shown]
    columns, rows = _with_examples(columns, rows, texts)
    note = picture_note([candidate.input for candidate in report.candidates]) if report.candidates else None
    solver = report.solver
    lines = [
        (
            f"**Mislabel candidates**: epoch {report.epoch}, global step {report.global_step}, top "
            f"{len(report.candidates)} of {report.train_size} training examples by {ranking_label(report)}"
            + (f" (the first {len(shown)} shown)." if len(shown) < len(report.candidates) else ".")
        ),
        "",
        f"- {ranking_line(report)}",
        *([f"- {flip_count_line(report.flip_count)}"] if report.flip_count is not None else []),
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


def ranking_label(report: MislabelReport) -> str:
    """What orders the candidates, in words: ``|I(z, z)|`` or the training-signal ranking's name."""
    return "|I(z, z)|" if report.ranking == "self_influence" else f"`{report.ranking}` (training signals)"


def ranking_line(report: MislabelReport) -> str:
    """One sentence: the training signals the ranking used, or that there were none and what that costs."""
    signals = report.signals
    if signals is None:
        return NO_SIGNALS_NOTE
    epochs = list(signals.get("epochs", []))
    span = f"epochs {epochs[0]}-{epochs[-1]}" if epochs else "no epochs"
    return (f"Ranked by `{report.ranking}` from training signals recorded at {len(epochs)} checkpoints ({span},"
            f" {format_float(signals.get('seconds'), 3)} s); the self-influence and signal rankings are in the"
            " JSON `rankings`.")


def flip_count_line(count: dict[str, Any]) -> str:
    """One sentence: how many training labels are estimated wrong (with the interval) and how many are flagged."""
    level = round(100 * float(count.get("level", 0.95)))
    plausible = ""
    if count.get("plausible_low") is not None and count.get("plausible_high") is not None:
        plausible = (f"; plausible range {format_float(count['plausible_low'], 4)}-"
                     f"{format_float(count['plausible_high'], 4)}, wide where flips are plausible ones")
    return (f"Estimated wrong labels: {format_float(count['estimate'], 4)} ({level}% interval"
            f" {format_float(count['low'], 4)}-{format_float(count['high'], 4)}, {count['method']}{plausible});"
            f" the first {count['flagged']} of the ranking are flagged"
            f" (score >= {format_float(count['threshold'], 4)}).")


def confusion_candidates(report: MislabelReport) -> int:
    """How many of the top candidates the per-class table counts: all of them, or the top 10% (at least
    ``MISLABEL_SHOWN``) when the whole training set is ranked."""
    count = len(report.candidates)
    if count < report.train_size:
        return count
    return min(count, max(MISLABEL_SHOWN, report.train_size // 10))


def mislabel_confusion_markdown(report: MislabelReport) -> str:
    """Per-class table of the candidates: how many per (given label, predicted label) pair, largest first.

    The predicted label is the training signals' suggested label (the most likely other class over the
    recorded checkpoints) when there is one, else the model's prediction. An asymmetric confusion (one
    class's labels flipped to one other class) shows up as one large row.
    """
    counted = report.candidates[:confusion_candidates(report)]
    records = confusion_records([c.label for c in counted],
                                [c.prediction if c.suggested_label is None else c.suggested_label for c in counted])
    predicted = "suggested label (training signals)" if report.signals is not None else "prediction"
    lines = [
        (f"**Mislabel candidates per class**: epoch {report.epoch}, global step {report.global_step}; the top"
         f" {len(counted)} candidates by {ranking_label(report)}, counted per (given label, {predicted}), largest"
         " first."),
        "",
        _table(("given label", "predicted label", "candidates", "share"),
               [[format_value(r["given_label"]), format_value(r["predicted_label"]), str(r["count"]),
                 f"{r['count'] / len(counted):.0%}"] for r in records]) if records else "_No candidates._",
    ]
    return "\n".join(lines)


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
