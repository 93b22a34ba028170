"""Publish results the same way from the callback and the command line: TensorBoard, JSON files, console.

One place turns an :class:`~lightning_influence.results.Explanation` into an
:class:`~lightning_influence.reporting.InfluenceReport` and hands it (or a mislabel report) to every writer,
so ``InfluenceCallback`` and ``lightning-influence`` produce identical outputs for the same analysis.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from lightning_influence.reporting import (
    InfluenceReport,
    print_mislabel_summary,
    print_summary,
    write_mislabel_files,
    write_mislabel_report,
    write_report,
    write_report_files,
    write_score_index,
    write_score_shard,
)
from lightning_influence.reporting.views import write_views
from lightning_influence.results import Explanation, MislabelReport

#: What a report adds to an explanation: when (``epoch``, ``global_step``) and why (``stage``) it was made.
STAMP = ("epoch", "global_step", "stage")
#: What an explanation holds that its report leaves out: this rank's full scores (written as shards beside it).
RANK_LOCAL = ("score_shard",)


def influence_report(explanation: Explanation, *, epoch: int, global_step: int, stage: str) -> InfluenceReport:
    """The report record of ``explanation``, stamped with when (``epoch``, ``global_step``) and why (``stage``).

    Every other field of the report is the explanation's field of the same name (taken by name, not copied by
    hand: ``tests/unit/reporting/test_publish_fields.py`` checks that the two records differ by exactly
    :data:`STAMP` and :data:`RANK_LOCAL`)."""
    shared = {f.name: getattr(explanation, f.name) for f in dataclasses.fields(InfluenceReport) if f.name not in STAMP}
    return InfluenceReport(epoch=epoch, global_step=global_step, stage=stage, **shared)


def publish_explanation(
    writer: Any, log_dir: Path, explanation: Explanation, *, epoch: int, global_step: int, stage: str, verbose: bool
) -> Path:
    """Write ``explanation`` to TensorBoard (``writer``) and to ``log_dir/influence/epoch={epoch}.json`` (rank 0).

    With full scores kept, also the index ``epoch={epoch}-scores.json`` of the shard files that
    :func:`publish_score_shard` writes on every rank.

    Args:
        writer: a ``SummaryWriter`` (see :func:`~lightning_influence.reporting.write_report`).
        log_dir: the run directory; files go to its ``influence/`` subdirectory.
        explanation: what :func:`~lightning_influence.analysis.explain.explain` returned.
        epoch: epoch stamped on the report (and in the file name).
        global_step: TensorBoard step of every event.
        stage: which trigger ran the analysis (``"fit_end"``, ``"validation"``, ``"validate"``, ``"posthoc"``).
        verbose: also print the summary table.

    Returns:
        The path of the JSON file.
    """
    report = influence_report(explanation, epoch=epoch, global_step=global_step, stage=stage)
    write_report(writer, report)
    write_views(writer, report)
    path = write_report_files(Path(log_dir) / "influence", report)
    if explanation.score_shard is not None:
        write_score_index(Path(log_dir) / "influence", epoch, [p.val_index for p in explanation.points],
                          explanation.train_size, explanation.score_shard.world_size)
    if verbose:
        print_summary(report)
    return path


def publish_score_shard(log_dir: Path, explanation: Explanation, epoch: int) -> Optional[Path]:
    """Write this rank's full-score shard ``log_dir/influence/epoch={epoch}-scores-rank{r}.pt`` (every rank).

    Returns:
        The shard's path, or None when full scores were not kept.
    """
    shard = explanation.score_shard
    if shard is None:
        return None
    return write_score_shard(Path(log_dir) / "influence", epoch, [p.val_index for p in explanation.points],
                             shard.train_indices, shard.scores, shard.rank, shard.world_size)


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
