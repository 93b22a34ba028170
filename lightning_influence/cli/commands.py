"""The subcommands that analyse a checkpoint (``influence``, ``mislabel``) or a written report (``export``), and
what every subcommand runs with them (progress, the finite-loss check, exports, the closing hint). Each subcommand
is an ``add_arguments(parser)`` and a ``run(args) -> exit status`` pair; the flags are in :mod:`.options`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

from lightning_influence.cli.loading import PosthocContext, UsageError, import_object, load_context, load_snapshots
from lightning_influence.cli.options import (
    INFLUENCE_OPTIONS,
    MISLABEL_OPTIONS,
    add_checkpoint_arguments,
    flags_of,
)
from lightning_influence.config import check_num_candidates  # torch-free: `--help` stays fast

#: The ``stage`` of every post-hoc report (the callback's are ``validation``, ``fit_end`` and ``validate``).
STAGE = "posthoc"


# -- influence -------------------------------------------------------------------------------------------------
def add_influence_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    group = parser.add_argument_group("analysis (the InfluenceCallback arguments of the same names)")
    for option in INFLUENCE_OPTIONS:
        option.add_to(group)
    parser.add_argument("--pif-json", metavar="PATH", help="also write the top lists keyed by validation id in"
                        " pytorch-influence-functions' layout (harmful/helpful in THIS package's sign convention)")
    parser.add_argument("--snapshot", action="append", default=[], metavar="CKPT",
                        help="an earlier checkpoint of the same run (repeatable): the influence is averaged over these"
                             " weights and the checkpoint's own, as the callback's `snapshots` does")


def run_influence(args: argparse.Namespace) -> int:
    from lightning_influence.analysis.explain import explain
    from lightning_influence.core.tensors.data import IndexedData
    from lightning_influence.reporting import report_to_dict
    from lightning_influence.reporting.publish import influence_report, publish_explanation, publish_score_shard

    check_exports(args)
    context = load_context(args)
    flags = flags_of(args, INFLUENCE_OPTIONS)
    settings = context.settings(flags)
    describe = _describe(context.callback_args, flags)
    chunk = settings.explain.chunk_size
    train = IndexedData.from_loader(context.train_loader, chunk)
    check_num_candidates(settings.explain.num_candidates, len(train))  # before the solve, not at the kNN search
    loss_fn = context.loss_fn(settings.loss_fn)
    check_training_losses(context, loss_fn, train, args.device)
    snapshots = load_snapshots(context.model, args.snapshot)
    steps = getattr(settings.solver, "depth", 0) * getattr(settings.solver, "repeats", 0)
    waiting = "validation losses, damping and LiSSA scale" if steps else "validation losses, damping and solve"
    with progress_tasks(args, ("influence: s_test", steps, waiting),
                        ("influence: scoring", len(train), None if steps else waiting)) as (on_step, on_scored):
        explanation = explain(context.model, loss_fn, train,
                              IndexedData.from_loader(single_loader(context.val_loader), chunk),
                              settings.problem(context.weight_decay), settings.explain, on_lissa_step=lambda: on_step(1),
                              on_scored=on_scored, describe=describe, snapshots=snapshots)
    try:
        publish_score_shard(context.output_dir, explanation, context.epoch)
        path = publish_explanation(context.writer(), context.output_dir, explanation, epoch=context.epoch,
                                   global_step=context.global_step, stage=STAGE, verbose=not args.quiet)
    finally:
        context.close()
    asked = settings.explain.num_worst if settings.explain.val_indices is None else None
    if asked is not None and len(explanation.points) < asked:
        print(f"Explained {len(explanation.points)} of the {asked} validation points asked for (--num-worst):"
              + (f" only {len(explanation.points)} are misclassified (--misclassified-only)."
                 if settings.explain.misclassified_only else f" the validation set has {len(explanation.points)}."))
    report = report_to_dict(influence_report(explanation, epoch=context.epoch, global_step=context.global_step,
                                             stage=STAGE))
    _exports(args, report, explanation.full_scores)
    report_done(context, path)
    return 0


def _describe(callback_args: dict[str, Any], flags: dict[str, Any]) -> Any:
    """``describe_batch`` with the ``example_formatter`` of the flags or the config (an import path or a callable)."""
    import functools

    from lightning_influence.core.tensors.batching import describe_batch

    formatter = flags.get("example_formatter", callback_args.get("example_formatter"))
    if isinstance(formatter, str):
        formatter = import_object(formatter, "`--example-formatter`")
    if formatter is not None and not callable(formatter):
        raise UsageError(f"Expected `example_formatter` to name a function example -> str, but got {formatter!r}.")
    return functools.partial(describe_batch, example_formatter=formatter)


# -- mislabel --------------------------------------------------------------------------------------------------
def add_mislabel_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    group = parser.add_argument_group("analysis (self-influence I(z, z) = -g^T (H + damping I)^-1 g)")
    for option in MISLABEL_OPTIONS:
        option.add_to(group)


def run_mislabel(args: argparse.Namespace) -> int:
    from lightning_influence.analysis.mislabel import find_mislabel_candidates
    from lightning_influence.core.tensors.data import IndexedData
    from lightning_influence.reporting import mislabel_to_dict
    from lightning_influence.reporting.publish import publish_mislabel
    from lightning_influence.reporting.tables import ranking_line

    check_exports(args)
    context = load_context(args)
    flags = flags_of(args, MISLABEL_OPTIONS)
    if not flags.get("mislabel_candidates", context.callback_args.get("mislabel_candidates")):
        flags["mislabel_candidates"] = MISLABEL_OPTIONS[0].default
    settings = context.settings(flags)
    train = IndexedData.from_loader(context.train_loader, settings.explain.chunk_size)
    loss_fn = context.loss_fn(settings.loss_fn)
    check_training_losses(context, loss_fn, train, args.device)
    waiting = f"top {settings.mislabel.rank} curvature eigenpairs (Lanczos) and damping"
    with progress_tasks(args, ("mislabel: self-influence", len(train), waiting)) as (on_scored,):
        report = find_mislabel_candidates(
            context.model, loss_fn, train, settings.problem(context.weight_decay, settings.mislabel),
            settings.mislabel_count, epoch=context.epoch, global_step=context.global_step, on_scored=on_scored,
        )
    try:
        path = publish_mislabel(context.writer(), context.output_dir, report, verbose=not args.quiet)
    finally:
        context.close()
    _exports(args, mislabel_to_dict(report), None)
    if report.signals is None and args.quiet:  # else the summary table's caption says it
        print(ranking_line(report))  # what ranking without training signals costs (also in the JSON)
    report_done(context, path)
    return 0


# -- export ----------------------------------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="an epoch=N.json or mislabel_epoch=N.json written by the callback or this"
                        " command")
    parser.add_argument("--table", metavar="PATH", help="write a long table, .csv or .parquet (needs pandas)")
    parser.add_argument("--pif-json", metavar="PATH", help="write the top lists in pytorch-influence-functions'"
                        " layout (influence reports only)")
    parser.add_argument("--relabel", metavar="PATH", help="write the mislabel candidates as a relabel list, .csv or"
                        " .json (rank, train_index, given_label, predicted_label, new_label = predicted_label to"
                        " edit, score, self_influence, loss, loss_rank; mislabel reports only)")
    parser.add_argument("--scores", metavar="PATH", help="the score index epoch=N-scores.json beside the report"
                        " (written with --save-scores / save_scores=True): adds every training example's"
                        " influence to --pif-json")


def run_export(args: argparse.Namespace) -> int:
    from lightning_influence.reporting import load_full_scores
    from lightning_influence.reporting.export import load_report

    if not args.table and not args.pif_json and not args.relabel:
        raise UsageError("Nothing to export: pass `--table out.csv` (or .parquet), `--pif-json out.json` and/or"
                         " `--relabel out.csv` (or .json).")
    check_exports(args)
    report = load_report(args.report)
    if args.relabel:
        if "candidates" not in report:
            raise UsageError(f"`--relabel` needs a mislabel report (mislabel_epoch=N.json), but `{args.report}` is an"
                             " influence report.")
        from lightning_influence.reporting.relabel import write_relabel

        print(f"Relabel list: {write_relabel(report, args.relabel)}")
    scores = None
    if args.scores:
        val_indices, scores = load_full_scores(args.scores)
        if "points" not in report or val_indices != [p["val_index"] for p in report["points"]]:
            raise UsageError(f"`{args.scores}` holds scores for validation points {val_indices}, which are not the"
                             f" points of `{args.report}`: pass the score index of the same epoch.")
    _exports(args, report, scores)
    return 0


# -- shared ----------------------------------------------------------------------------------------------------
def check_exports(args: argparse.Namespace) -> None:
    """Fail before a long analysis, not after it, when the table cannot be written."""
    from lightning_influence.reporting.export import check_table_path

    if getattr(args, "table", None):
        check_table_path(args.table)


def _exports(args: argparse.Namespace, report: dict[str, Any], full_scores: Any) -> None:
    from lightning_influence.reporting.export import export_table, write_pytorch_influence_functions_json

    if getattr(args, "table", None):
        print(f"Table: {export_table(report, args.table)}")
    if getattr(args, "pif_json", None):
        print(f"pytorch-influence-functions layout: {write_pytorch_influence_functions_json(report, args.pif_json, full_scores)}")


#: One progress task: description, total units, and the work before its first unit (or None).
Task = tuple[str, int, Optional[str]]


@contextlib.contextmanager
def progress_tasks(args: argparse.Namespace, *tasks: Task) -> Iterator[list[Callable[[int], None]]]:
    """Progress of each task on stderr (nothing with ``--quiet``); yields one ``advance(n)`` per task.

    One rich display on a terminal (a rich display cannot nest), else a line every few seconds per task;
    rates count from each task's first unit, and its ``waiting`` label names the work before that unit
    (shown, with its elapsed time, while it runs).
    """
    import sys

    from lightning_influence.callbacks.progress import log_lines, own_rich_progress, rich_task

    with contextlib.ExitStack() as stack:
        if args.quiet:
            yield [_ignore for _ in tasks]
            return
        if not sys.stderr.isatty():
            def emit(line: str) -> None:
                print(line, file=sys.stderr, flush=True)

            yield [stack.enter_context(log_lines(d, t, w, emit)) if t > 0 else _ignore for d, t, w in tasks]
            return
        from rich.console import Console

        display = stack.enter_context(own_rich_progress(Console(stderr=True)))
        yield [stack.enter_context(rich_task(display, d, t, w)) if t > 0 else _ignore for d, t, w in tasks]


def _ignore(n: int = 1) -> None:
    """Progress sink that does nothing."""


def check_training_losses(context: PosthocContext, loss_fn: Callable[[Any, Any], Any], train: Any,
                          device: str = "cpu") -> None:
    """Fail before the analysis, naming the training examples, when some have a non-finite loss (a NaN input,
    a label out of range): every curvature product and score would carry it, and the error would surface far
    from its cause (a failed eigensolver, or every validation point reported as bad)."""
    import torch

    from lightning_influence.core.tensors.batching import prepare_batch
    from lightning_influence.core.tensors.modes import analysis_mode

    bad: list[int] = []
    values: list[float] = []
    with analysis_mode(context.model), torch.no_grad():
        for indices, batch in train.batches_with_indices():
            losses = loss_fn(context.model, prepare_batch(batch, torch.device(device))).detach().cpu().reshape(-1)
            wrong = ~torch.isfinite(losses)
            bad += indices[wrong].tolist()
            values += losses[wrong].tolist()
    if bad:
        shown = ", ".join(f"{i} ({v})" for i, v in list(zip(bad, values))[:10]) + (" ..." if len(bad) > 10 else "")
        raise UsageError(f"Expected a finite loss for every training example, but {len(bad)} have none: dataset"
                         f" indices {shown}. Check their inputs and labels (a NaN or inf input, a label out of"
                         " range), or leave them out of the training DataLoader.")


def single_loader(loader: Any) -> Any:
    if isinstance(loader, (list, tuple)):
        if not loader:
            raise UsageError("The DataModule's val_dataloader() returned no loader: nothing to explain.")
        return loader[0]
    return loader


def report_done(context: PosthocContext, path: Path) -> None:
    print(f"Results: {path}\n{tensorboard_hint(context)}")


def tensorboard_hint(context: PosthocContext) -> str:
    """The TensorBoard command that shows this analysis beside the training run it belongs to, when the
    checkpoint sits in a Lightning run (``<run>/checkpoints/x.ckpt``) and the results were written inside it."""
    output = context.output_dir.resolve()
    folder = context.checkpoint.resolve().parent
    run = folder.parent if folder.name == "checkpoints" else None
    if run is not None and run in output.parents:
        return (f"TensorBoard (the training run and this analysis, under {output.relative_to(run)}):"
                f" tensorboard --logdir {_shown(run)}")
    return f"TensorBoard: tensorboard --logdir {_shown(output)}"


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is inside it (as the user typed it), else absolute."""
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path
