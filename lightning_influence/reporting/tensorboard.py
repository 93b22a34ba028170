"""Write an :class:`InfluenceReport` to TensorBoard: captioned grids, markdown tables, histograms, scalars.

Every tag lives under ``influence/``; see ``docs/output-format.md`` for the full list.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Protocol

import torch

from lightning_influence.config import MISLABEL_SHOWN
from lightning_influence.reporting.images import influence_grid_figure, looks_like_image, mislabel_grid_figure
from lightning_influence.reporting.tables import (
    mislabel_confusion_markdown,
    mislabel_markdown,
    point_markdown,
    report_markdown,
)
from lightning_influence.results import (
    ExplainedPoint,
    InfluenceReport,
    MislabelReport,
    SolveInfo,
    TrustReport,
)
from lightning_influence.results.analysis import trace_name

PREFIX = "influence"
MAX_TRACE_POINTS = 200


class SummaryWriterLike(Protocol):
    """What :func:`write_report` needs from a writer (``torch.utils.tensorboard.SummaryWriter`` has it)."""

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None) -> Any: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> Any: ...

    def add_histogram(self, tag: str, values: Any, global_step: int | None = None) -> Any: ...

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None) -> Any: ...

    def flush(self) -> Any: ...


def write_report(writer: SummaryWriterLike, report: InfluenceReport) -> None:
    """Write everything in ``report`` to ``writer`` at step ``report.global_step``, then flush.

    Per point ``i`` (its validation index): ``influence/val_{i}/examples`` (a captioned image grid, one
    block per group, epoch and step in its title; only when the point and all its influencers carry image
    inputs, otherwise the table says why there is no grid), ``influence/val_{i}/table`` (markdown) and
    ``influence/val_{i}/scores`` (histogram of all scores, when present). For the report:
    ``influence/summary`` (markdown), ``influence/time/{key}_seconds`` per timing,
    ``influence/{solver}/final_update`` and the convergence trace
    ``influence/{solver}_trace/epoch_{epoch}/repeat_{r}`` (step = recursion step, 1-based) when the solver
    recorded a trace; ``{solver}`` is ``lissa`` for LiSSA.

    Args:
        writer: a ``SummaryWriter`` or anything with ``add_figure``, ``add_text``, ``add_histogram``,
            ``add_scalar`` and ``flush``.
        report: the analysis results.
    """
    step = report.global_step
    for point in report.points:
        _write_point(writer, point, report.solver, report.epoch, step)
    writer.add_text(f"{PREFIX}/summary", report_markdown(report), global_step=step)
    for key, seconds in report.timings.items():
        writer.add_scalar(f"{PREFIX}/time/{_tag_part(key)}_seconds", float(seconds), global_step=step)
    _write_trace(writer, report.solver, report.epoch, step)
    if report.trust is not None:
        write_trust(writer, report.trust, step)
    writer.flush()


def write_trust(writer: SummaryWriterLike, trust: TrustReport, step: int) -> None:
    """The self-diagnosis under ``influence/trust/``: per point ``val_{i}/residual``, ``val_{i}/repeat_pearson``
    and ``val_{i}/repeat_spearman`` (when defined); ``gradient_ratio``, ``top_eigenvalue`` and
    ``warning_count`` scalars; ``warnings`` (markdown list, also when empty).
    """
    tag = f"{PREFIX}/trust"
    for point in trust.points:
        for name in ("residual", "repeat_pearson", "repeat_spearman"):
            value = getattr(point, name)
            if value is not None:
                writer.add_scalar(f"{tag}/val_{point.val_index}/{name}", float(value), global_step=step)
    if trust.gradient_ratio is not None:
        writer.add_scalar(f"{tag}/gradient_ratio", float(trust.gradient_ratio), global_step=step)
    if trust.top_eigenvalue is not None:
        writer.add_scalar(f"{tag}/top_eigenvalue", float(trust.top_eigenvalue), global_step=step)
    writer.add_scalar(f"{tag}/warning_count", sum(w.severity == "warning" for w in trust.warnings), global_step=step)
    writer.add_text(f"{tag}/warnings", trust_markdown(trust), global_step=step)


def trust_markdown(trust: TrustReport) -> str:
    """A markdown list of the warnings (``**code** (severity): message``) and the measured diagnostics."""
    lines = [f"- **{w.code}** ({w.severity}): {w.message}" for w in trust.warnings] or ["- no warnings"]
    lines.append("")
    lines.append(f"Residuals use the Hessian of {trust.residual_examples} training examples; gradient ratio on"
                 f" {trust.gradient_examples}.")
    lines.append("")
    lines.append("| val index | residual | repeat Pearson | repeat Spearman |")
    lines.append("| --- | --- | --- | --- |")
    for p in trust.points:
        cells = [_number(v) for v in (p.residual, p.repeat_pearson, p.repeat_spearman)]
        lines.append(f"| {p.val_index} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_mislabel_report(writer: SummaryWriterLike, report: MislabelReport) -> None:
    """Write a mislabel analysis to ``writer`` at step ``report.global_step``, then flush.

    Tags: ``influence/mislabel/examples`` (captioned image grid of the first ``MISLABEL_SHOWN`` candidates,
    only when there are candidates and every one carries an image input), ``influence/mislabel/table``
    (markdown), ``influence/mislabel/per_class`` (markdown: candidates per given/predicted label pair),
    ``influence/mislabel/self_influence`` (histogram of ``report.scores``, when present), the scalar
    ``influence/mislabel/seconds`` and, with training signals, the scalars ``influence/mislabel/estimated_flips``,
    ``estimated_flips_low``, ``estimated_flips_high``, ``flagged``, ``plausible_flips_low`` and
    ``plausible_flips_high`` (the last two when the count has its plausible range).

    Args:
        writer: a ``SummaryWriter`` or anything with ``add_figure``, ``add_text``, ``add_histogram``,
            ``add_scalar`` and ``flush``.
        report: the mislabel analysis.
    """
    step = report.global_step
    tag = f"{PREFIX}/mislabel"
    shown = replace(report, candidates=report.candidates[:MISLABEL_SHOWN])  # the grid: the top candidates only
    if shown.candidates and all(
        candidate.input is not None and looks_like_image(candidate.input) for candidate in shown.candidates
    ):
        writer.add_figure(f"{tag}/examples", mislabel_grid_figure(shown), global_step=step)
    writer.add_text(f"{tag}/table", mislabel_markdown(report), global_step=step)
    writer.add_text(f"{tag}/per_class", mislabel_confusion_markdown(report), global_step=step)
    if report.scores is not None:
        _write_histogram(writer, f"{tag}/self_influence", report.scores, step)
    writer.add_scalar(f"{tag}/seconds", float(report.seconds), global_step=step)
    if report.flip_count is not None:
        count = report.flip_count
        for name, key in (("estimated_flips", "estimate"), ("estimated_flips_low", "low"),
                          ("estimated_flips_high", "high"), ("flagged", "flagged")):
            writer.add_scalar(f"{tag}/{name}", float(count[key]), global_step=step)
        for name, key in (("plausible_flips_low", "plausible_low"), ("plausible_flips_high", "plausible_high")):
            if count.get(key) is not None:
                writer.add_scalar(f"{tag}/{name}", float(count[key]), global_step=step)
    writer.flush()


def _write_histogram(writer: SummaryWriterLike, tag: str, values: torch.Tensor, step: int) -> None:
    """A histogram of the finite entries of ``values`` (nothing when none is finite)."""
    values = values.detach().to("cpu", torch.float64).flatten()
    values = values[torch.isfinite(values)]
    if values.numel() > 0:
        writer.add_histogram(tag, values, global_step=step)


def has_image_inputs(point: ExplainedPoint) -> bool:
    """Whether ``point`` and every one of its influencers carry an input that looks like an image."""
    inputs = [point.input] + [influencer.input for influencer in (*point.harmful, *point.helpful)]
    return all(x is not None and looks_like_image(x) for x in inputs)


def _write_point(writer: SummaryWriterLike, point: ExplainedPoint, solver: SolveInfo, epoch: int, step: int) -> None:
    tag = f"{PREFIX}/val_{point.val_index}"
    if has_image_inputs(point):
        figure = influence_grid_figure(point, epoch=epoch, global_step=step)
        writer.add_figure(f"{tag}/examples", figure, global_step=step)
    writer.add_text(f"{tag}/table", point_markdown(point, solver), global_step=step)
    if point.scores is not None:
        _write_histogram(writer, f"{tag}/scores", point.scores, step)


def _write_trace(writer: SummaryWriterLike, solver: SolveInfo, epoch: int, step: int) -> None:
    """The solver's final trace value (max over repeats) and each repeat's subsampled trace.

    Tags carry the solver's name: ``influence/lissa/final_update`` and ``influence/lissa_trace/...`` for
    LiSSA (relative update per recursion step), ``influence/cg/...`` for CG (relative residuals), also for a LiSSA
    solve routed to CG from the start (:func:`~lightning_influence.results.analysis.trace_name`).
    """
    if solver.trace is None or solver.trace.numel() == 0:
        return
    trace = solver.trace.detach().to("cpu", torch.float64)
    trace = trace.reshape(1, -1) if trace.ndim == 1 else trace
    name = _tag_part(trace_name(solver.solver, solver.settings))
    finals = []
    for repeat, row in enumerate(trace):
        steps = subsample_steps(row)
        for index in steps.tolist():
            writer.add_scalar(
                f"{PREFIX}/{name}_trace/epoch_{epoch}/repeat_{repeat}",
                float(row[index]),
                global_step=index + 1,
            )
        if steps.numel() > 0:
            finals.append(float(row[steps[-1]]))
    if finals:
        writer.add_scalar(f"{PREFIX}/{name}/final_update", max(finals), global_step=step)


def subsample_steps(row: torch.Tensor, max_points: int = MAX_TRACE_POINTS) -> torch.Tensor:
    """Zero-based positions of at most ``max_points`` finite values in ``row``, evenly spread.

    The first and the last finite values are always kept; NaN padding (and inf) is skipped.

    Example:
        >>> subsample_steps(torch.tensor([1.0, 0.5, 0.2, float("nan")]), max_points=2).tolist()
        [0, 2]
    """
    if max_points < 2:
        raise ValueError(f"Expected `max_points` to be at least 2, but got {max_points}.")
    finite = torch.isfinite(row).nonzero().flatten()
    if finite.numel() <= max_points:
        return finite
    picks = torch.linspace(0, finite.numel() - 1, max_points, dtype=torch.float64).round().long()
    return finite[picks.unique()]


def _tag_part(name: str) -> str:
    """Make ``name`` safe inside a tag: anything but letters, digits, ``_``, ``-`` and ``.`` becomes ``_``."""
    return re.sub(r"[^\w.\-]", "_", str(name))
