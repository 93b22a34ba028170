"""Publish results the same way from the callback and the command line: TensorBoard, JSON files, console.

One place turns an :class:`~lightning_influence.explain.Explanation` into an
:class:`~lightning_influence.reporting.InfluenceReport` and hands it (or a mislabel report) to every writer,
so ``InfluenceCallback`` and ``lightning-influence`` produce identical outputs for the same analysis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_influence.explain import Explanation
from lightning_influence.reporting import (
    InfluenceReport,
    print_mislabel_summary,
    print_summary,
    write_mislabel_files,
    write_mislabel_report,
    write_report,
    write_report_files,
)
from lightning_influence.reporting.records import MislabelReport


def influence_report(explanation: Explanation, *, epoch: int, global_step: int, stage: str) -> InfluenceReport:
    """The report record of ``explanation``, stamped with when (``epoch``, ``global_step``) and why (``stage``)."""
    return InfluenceReport(
        epoch=epoch, global_step=global_step, stage=stage, train_size=explanation.train_size,
        points=explanation.points, solver=explanation.solver, timings=explanation.timings,
    )


def publish_explanation(
    writer: Any, log_dir: Path, explanation: Explanation, *, epoch: int, global_step: int, stage: str, verbose: bool
) -> Path:
    """Write ``explanation`` to TensorBoard (``writer``) and to ``log_dir/influence/epoch={epoch}.json``.

    Args:
        writer: a ``SummaryWriter`` (see :func:`~lightning_influence.reporting.write_report`).
        log_dir: the run directory; files go to its ``influence/`` subdirectory.
        explanation: what :func:`~lightning_influence.explain.explain` returned.
        epoch: epoch stamped on the report (and in the file name).
        global_step: TensorBoard step of every event.
        stage: which trigger ran the analysis (``"fit_end"``, ``"validation"``, ``"validate"``, ``"posthoc"``).
        verbose: also print the summary table.

    Returns:
        The path of the JSON file.
    """
    report = influence_report(explanation, epoch=epoch, global_step=global_step, stage=stage)
    write_report(writer, report)
    path = write_report_files(Path(log_dir) / "influence", report, explanation.full_scores)
    if verbose:
        print_summary(report)
    return path


def publish_mislabel(writer: Any, log_dir: Path, report: MislabelReport, *, verbose: bool) -> Path:
    """Write a mislabel analysis to TensorBoard and to ``log_dir/influence/mislabel_epoch={epoch}.json``.

    Returns:
        The path of the JSON file.
    """
    write_mislabel_report(writer, report)
    path = write_mislabel_files(Path(log_dir) / "influence", report)
    if verbose:
        print_mislabel_summary(report)
    return path
