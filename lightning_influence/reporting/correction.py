"""TensorBoard curves and a markdown table for an error-correction run (:func:`lightning_influence.correct_errors`).

Tags, under ``{tag} = influence/correct/{name}`` (step = round; 0 = before the first round):
``{tag}/{set}/loss`` and ``{tag}/{set}/accuracy`` for every evaluation set (``anchors``, ``heldout``, ``val``),
``{tag}/anchor_loss_before`` / ``{tag}/anchor_loss_after`` (the round's sampled anchors, around its steps),
``{tag}/chosen_influence_mean`` (helpful/harmful only) and the text ``{tag}/summary``.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_influence.results import CorrectionIteration, CorrectionReport, Metrics


def write_correction_scalars(writer: Any, tag: str, step: int, metrics: dict[str, Metrics],
                             record: Optional[CorrectionIteration]) -> None:
    """The evaluation metrics at ``step`` and, after a round, its anchor losses and mean chosen influence."""
    for name, values in metrics.items():
        writer.add_scalar(f"{tag}/{name}/loss", values.loss, global_step=step)
        if values.accuracy is not None:
            writer.add_scalar(f"{tag}/{name}/accuracy", values.accuracy, global_step=step)
    if record is not None:
        writer.add_scalar(f"{tag}/anchor_loss_before", record.anchor_loss_before, global_step=step)
        writer.add_scalar(f"{tag}/anchor_loss_after", record.anchor_loss_after, global_step=step)
        if record.chosen_influence:
            mean = sum(record.chosen_influence) / len(record.chosen_influence)
            writer.add_scalar(f"{tag}/chosen_influence_mean", mean, global_step=step)


def write_correction_summary(writer: Any, tag: str, report: CorrectionReport) -> None:
    writer.add_text(f"{tag}/summary", correction_markdown(report), global_step=len(report.iterations))


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _damping(settings: dict) -> str:
    """The damping the solves used (a number, or the first and last round's), with what was asked when it differs."""
    used, asked = settings.get("damping"), settings.get("damping_requested")
    if isinstance(used, dict):
        text = f"{used['first']:.3g} (round 1) to {used['last']:.3g}"
    else:
        text = f"{used:.3g}" if isinstance(used, (int, float)) else str(used)
    residual = settings.get("residual_max")
    text += f" ({asked})" if asked is not None and asked != used else ""
    return text + (f", s_test residual up to {residual:.3g}" if isinstance(residual, (int, float)) else "")


def correction_markdown(report: CorrectionReport) -> str:
    """Settings, the before/after table per evaluation set, and per round the chosen examples."""
    s = report.settings
    searched = " (line search)" if s.get("lr_requested") == "auto" else ""
    heading = (
        f"**Error correction** (selection `{report.selection}`): {len(report.iterations)} rounds,"
        f" {s.get('anchors_per_iteration')} anchors, {s.get('examples_per_iteration')} examples and"
        f" {s.get('steps_per_iteration')} step(s) per round, lr {s.get('lr')}{searched}"
        f" ({s.get('optimizer')}),"
        f" solver {s.get('solver')}, damping {_damping(s)}. Influence I(z, A) = -s_test . grad L(z):"
        " negative = helpful to the anchors, positive = harmful."
    )
    lines = [
        heading,
        "",
        "| set | size | loss before | loss after | accuracy before | accuracy after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, before in report.before.items():
        after = report.after[name]
        lines.append(f"| {name} | {before.size} | {_fmt(before.loss)} | {_fmt(after.loss)} |"
                     f" {_fmt(before.accuracy)} | {_fmt(after.accuracy)} |")
    if report.iterations:
        lines += ["", "| round | anchor loss before | anchor loss after | chosen (dataset indices) |",
                  "| --- | --- | --- | --- |"]
        for r in report.iterations:
            chosen = ", ".join(str(i) for i in r.chosen_indices[:10]) + (" ..." if len(r.chosen_indices) > 10 else "")
            lines.append(f"| {r.iteration} | {_fmt(r.anchor_loss_before)} | {_fmt(r.anchor_loss_after)} | {chosen} |")
    return "\n".join(lines)
