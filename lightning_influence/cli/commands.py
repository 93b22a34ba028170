"""The subcommands. Each is an ``add_arguments(parser)`` and a ``run(args) -> exit status`` pair.

Analysis settings are the ``InfluenceCallback``'s own constructor arguments (the callback validates them),
so the command line and the callback cannot drift apart: ``--top-k 5`` is ``InfluenceCallback(top_k=5)``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from lightning_influence.cli.loading import PosthocContext, UsageError, import_object, load_context
from lightning_influence.cli.threads import AUTO, parse_threads
from lightning_influence.config import (  # torch-free: `--help` stays fast
    CURVATURES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CURVATURE,
    DEFAULT_DAMPING,
    DEFAULT_SCORING,
    DEFAULT_SOLVER,
    SCORING_METHODS,
    SOLVERS,
    CGConfig,
    LissaConfig,
    LowRankConfig,
    check_num_candidates,
)

STAGE = "posthoc"


@dataclass(frozen=True)
class Option:
    """A command-line flag that sets the ``InfluenceCallback`` argument ``dest`` (unset flags keep its default)."""

    flag: str
    dest: str
    default: Any
    help: str
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[tuple[str, ...]] = None
    nargs: Optional[str] = None
    switch: bool = False
    aliases: tuple[str, ...] = ()  # older spellings still accepted (not shown in --help)

    def add_to(self, parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup]) -> None:
        text = f"{self.help} (default: {self.default})"
        if self.switch:
            parser.add_argument(self.flag, dest=self.dest, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(self.flag, dest=self.dest, type=self.type or str, choices=self.choices,
                                nargs=self.nargs, default=argparse.SUPPRESS, help=text)
        for alias in self.aliases:
            parser.add_argument(alias, dest=self.dest, type=self.type or str, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)


def _scale(text: str) -> Union[float, str]:
    return text if text == "auto" else float(text)


_damping = _scale  # a number, or "auto"


def _top(text: str) -> Union[int, str]:
    return text if text == "all" else int(text)


INFLUENCE_OPTIONS = (
    Option("--val-indices", "val_indices", None, "validation dataset indices to explain (else the worst ones)",
           type=int, nargs="+"),
    Option("--num-worst", "num_worst", 8, "how many highest-loss validation examples to explain", type=int),
    Option("--misclassified-only", "misclassified_only", False, "pick the worst among misclassified examples only",
           switch=True),
    Option("--top-k", "top_k", 10, "harmful and helpful training examples listed per point", type=int),
    Option("--solver", "solver", DEFAULT_SOLVER, "inverse-Hessian solver for s_test", choices=SOLVERS),
    Option("--damping", "damping", DEFAULT_DAMPING, "lambda added to the curvature, or 'auto' (a fraction of its top"
           " eigenvalue)", type=_damping),
    Option("--curvature", "curvature", DEFAULT_CURVATURE, "the curvature C of (C + damping I) s = grad L",
           choices=CURVATURES),
    Option("--depth", "depth", LissaConfig.depth, "LiSSA recursion steps J per repeat", type=int),
    Option("--repeats", "repeats", LissaConfig.repeats, "LiSSA independent repeats T, averaged", type=int),
    Option("--batch-size", "batch_size", LissaConfig.batch_size, "LiSSA minibatch size B of each curvature product",
           type=int),
    Option("--scale", "scale", LissaConfig.scale, "LiSSA scale (a number above the top minibatch-Hessian eigenvalue, or"
           " 'auto' to estimate it)", type=_scale),
    Option("--seed", "seed", LissaConfig.seed, "LiSSA sampling seed", type=int),
    Option("--tol", "tol", None, "LiSSA early-stop or CG tolerance (None: the solver's own)", type=float),
    Option("--max-iter", "max_iter", CGConfig.max_iter, "CG iterations", type=int),
    Option("--scoring", "scoring", DEFAULT_SCORING, "how training examples are scored",
           choices=SCORING_METHODS),
    Option("--chunk-size", "chunk_size", DEFAULT_CHUNK_SIZE, "training examples scored at once (bounds memory)", type=int),
    Option("--num-candidates", "num_candidates", None, "score each point only against its N nearest training examples"
           " (FastIF; None: every training example)", type=int),
    Option("--example-formatter", "example_formatter", None, "import path of a function example -> str (e.g. a"
           " tokenizer's decode) shown beside each example in the tables and the JSON"),
    Option("--save-scores", "save_scores", False, "also write the full [points, n_train] score table"
           " (epoch=N-scores.json index + epoch=N-scores-rank0.pt)", switch=True),
)

MISLABEL_OPTIONS = (
    Option("--top", "mislabel_candidates", 20, "training examples to list, largest |I(z, z)| first, or 'all' (the"
           " JSON ranks the whole training set)", type=_top, aliases=("--candidates",)),
    Option("--rank", "mislabel_rank", LowRankConfig.rank, "eigenpairs of H (Lanczos) used for self-influence", type=int),
    Option("--damping", "damping", DEFAULT_DAMPING, "lambda added to the curvature, or 'auto'", type=_damping),
    Option("--curvature", "curvature", DEFAULT_CURVATURE, "the curvature C of (C + damping I)", choices=CURVATURES),
    Option("--chunk-size", "chunk_size", DEFAULT_CHUNK_SIZE, "training examples per batch of gradients", type=int),
)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every post-hoc subcommand shares: what to load and where to write."""
    parser.add_argument("checkpoint", help="the Lightning checkpoint (.ckpt) to analyse")
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", help="LightningModule class as an import path, e.g. examples.digits:DigitsCNN;"
                        " restored with Model.load_from_checkpoint (saved hyperparameters)")
    source.add_argument("--model-args", metavar="JSON", help="JSON object of keyword arguments overriding the"
                        " checkpoint's hyperparameters, e.g. '{\"lr\": 0.01}'")
    source.add_argument("--datamodule", help="LightningDataModule class as an import path; its train_dataloader()"
                        " is scored and its val_dataloader() explained (default: the model's own loader hooks)")
    source.add_argument("--datamodule-args", metavar="JSON", help="JSON object of keyword arguments for the"
                        " DataModule's constructor")
    source.add_argument("--config", help="a LightningCLI config file (model:, data:, trainer.callbacks: ...). Model"
                        " and data are built from it; an InfluenceCallback under trainer.callbacks gives the"
                        " analysis settings, which flags override. --model/--datamodule name the classes when"
                        " the config has no class_path for them")
    source.add_argument("--loss-fn", help="per-example loss as an import path to a callable (module, batch) ->"
                        " Tensor[B] (default: the model's per_example_loss(batch) method)")
    source.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda:0 (default: cpu)")
    source.add_argument("--threads", type=parse_threads, default=AUTO, help="CPU threads for torch: a number, or"
                        " 'auto' (default): OMP_NUM_THREADS when set, else the cores that the machine's load leaves"
                        " idle (at least 1). More threads than idle cores make the analysis several times slower")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", help="run directory for TensorBoard events and influence/*.json (default:"
                     " <checkpoint dir>/<checkpoint name>-influence)")
    out.add_argument("--table", metavar="PATH", help="also export the results as a long table, .csv or .parquet"
                     " (needs pandas; Parquet also pyarrow)")
    out.add_argument("--quiet", action="store_true", help="do not print the summary table")


def flags_of(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
    flags = {o.dest: getattr(args, o.dest) for o in options if hasattr(args, o.dest)}
    if getattr(args, "loss_fn", None):
        flags["loss_fn"] = import_object(args.loss_fn, "`--loss-fn`")
    return flags


# -- influence -------------------------------------------------------------------------------------------------
def add_influence_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    group = parser.add_argument_group("analysis (the InfluenceCallback arguments of the same names)")
    for option in INFLUENCE_OPTIONS:
        option.add_to(group)
    parser.add_argument("--pif-json", metavar="PATH", help="also write the top lists keyed by validation id in"
                        " pytorch-influence-functions' layout (harmful/helpful in THIS package's sign convention)")


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
    steps = getattr(settings.solver, "depth", 0) * getattr(settings.solver, "repeats", 0)
    waiting = "validation losses, damping and LiSSA scale" if steps else "validation losses, damping and solve"
    with progress_tasks(args, ("influence: s_test", steps, waiting),
                        ("influence: scoring", len(train), None if steps else waiting)) as (on_step, on_scored):
        explanation = explain(context.model, loss_fn, train,
                              IndexedData.from_loader(single_loader(context.val_loader), chunk),
                              settings.problem(context.weight_decay), settings.explain, on_lissa_step=lambda: on_step(1),
                              on_scored=on_scored, describe=describe)
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
