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

#: ``lightning_influence.core.config.SCORING_METHODS``, repeated so that ``--help`` does not import torch (tested).
SCORING_METHODS = ("auto", "hooks", "factored", "jvp", "per_example_grad")

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

    def add_to(self, parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup]) -> None:
        text = f"{self.help} (default: {self.default})"
        if self.switch:
            parser.add_argument(self.flag, dest=self.dest, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(self.flag, dest=self.dest, type=self.type or str, choices=self.choices,
                                nargs=self.nargs, default=argparse.SUPPRESS, help=text)


def _scale(text: str) -> Union[float, str]:
    return text if text == "auto" else float(text)


INFLUENCE_OPTIONS = (
    Option("--val-indices", "val_indices", None, "validation dataset indices to explain (else the worst ones)",
           type=int, nargs="+"),
    Option("--num-worst", "num_worst", 8, "how many highest-loss validation examples to explain", type=int),
    Option("--misclassified-only", "misclassified_only", False, "pick the worst among misclassified examples only",
           switch=True),
    Option("--top-k", "top_k", 10, "harmful and helpful training examples listed per point", type=int),
    Option("--solver", "solver", "lissa", "inverse-Hessian solver for s_test", choices=("lissa", "cg", "exact")),
    Option("--damping", "damping", 0.01, "lambda added to the Hessian; at least the training weight decay",
           type=float),
    Option("--depth", "depth", 1000, "LiSSA recursion steps J per repeat", type=int),
    Option("--repeats", "repeats", 1, "LiSSA independent repeats T, averaged", type=int),
    Option("--batch-size", "batch_size", 128, "LiSSA minibatch size B of each Hessian-vector product", type=int),
    Option("--scale", "scale", "auto", "LiSSA scale (a number above the top minibatch-Hessian eigenvalue, or"
           " 'auto' to estimate it)", type=_scale),
    Option("--seed", "seed", 0, "LiSSA sampling seed", type=int),
    Option("--tol", "tol", None, "LiSSA early-stop or CG tolerance (None: the solver's own)", type=float),
    Option("--max-iter", "max_iter", 200, "CG iterations", type=int),
    Option("--scoring", "scoring", "auto", "how training examples are scored",
           choices=SCORING_METHODS),
    Option("--chunk-size", "chunk_size", 256, "training examples scored at once (bounds memory)", type=int),
    Option("--save-scores", "save_scores", False, "also write the full [points, n_train] score table"
           " (epoch=N-scores.json index + epoch=N-scores-rank0.pt)", switch=True),
)

MISLABEL_OPTIONS = (
    Option("--candidates", "mislabel_candidates", 20, "training examples to list, largest |I(z, z)| first", type=int),
    Option("--rank", "mislabel_rank", 64, "eigenpairs of H (Lanczos) used for self-influence", type=int),
    Option("--damping", "damping", 0.01, "lambda added to the Hessian", type=float),
    Option("--chunk-size", "chunk_size", 256, "training examples per batch of gradients", type=int),
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
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", help="run directory for TensorBoard events and influence/*.json (default:"
                     " <checkpoint dir>/<checkpoint name>-influence)")
    out.add_argument("--table", metavar="PATH", help="also export the results as a long table, .csv or .parquet"
                     " (needs pandas; Parquet also pyarrow)")
    out.add_argument("--quiet", action="store_true", help="do not print the summary table")


def _flags(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
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
    from lightning_influence.core.data import IndexedData
    from lightning_influence.explain import explain
    from lightning_influence.outputs import influence_report, publish_explanation, publish_score_shard
    from lightning_influence.reporting import report_to_dict

    _check_exports(args)
    context = load_context(args)
    callback = context.make_callback(_flags(args, INFLUENCE_OPTIONS))
    chunk = callback.settings.chunk_size
    train = IndexedData.from_loader(context.train_loader, chunk)
    steps = getattr(callback.solver_config, "depth", 0) * getattr(callback.solver_config, "repeats", 0)
    with _progress(args, "influence: s_test", steps) as on_step, \
            _progress(args, "influence: scoring", len(train)) as on_scored:
        explanation = explain(context.model, callback._resolve_loss_fn(context.model), train,
                              IndexedData.from_loader(_single(context.val_loader), chunk), callback.solver_config,
                              callback.damping, callback.settings, on_lissa_step=lambda: on_step(1),
                              on_scored=on_scored)
    try:
        publish_score_shard(context.output_dir, explanation, context.epoch)
        path = publish_explanation(context.writer(), context.output_dir, explanation, epoch=context.epoch,
                                   global_step=context.global_step, stage=STAGE, verbose=not args.quiet)
    finally:
        context.close()
    report = report_to_dict(influence_report(explanation, epoch=context.epoch, global_step=context.global_step,
                                             stage=STAGE))
    _exports(args, report, explanation.full_scores)
    _done(context, path)
    return 0


# -- mislabel --------------------------------------------------------------------------------------------------
def add_mislabel_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    group = parser.add_argument_group("analysis (self-influence I(z, z) = -g^T (H + damping I)^-1 g)")
    for option in MISLABEL_OPTIONS:
        option.add_to(group)


def run_mislabel(args: argparse.Namespace) -> int:
    from lightning_influence.core.data import IndexedData
    from lightning_influence.mislabel import find_mislabel_candidates
    from lightning_influence.outputs import publish_mislabel
    from lightning_influence.reporting import mislabel_to_dict

    _check_exports(args)
    context = load_context(args)
    flags = _flags(args, MISLABEL_OPTIONS)
    if not flags.get("mislabel_candidates", context.callback_args.get("mislabel_candidates")):
        flags["mislabel_candidates"] = MISLABEL_OPTIONS[0].default
    callback = context.make_callback(flags)
    train = IndexedData.from_loader(context.train_loader, callback.settings.chunk_size)
    with _progress(args, "influence: self-influence", len(train)) as on_scored:
        report = find_mislabel_candidates(
            context.model, callback._resolve_loss_fn(context.model), train, callback.mislabel_config,
            callback.damping, callback.mislabel_candidates, epoch=context.epoch, global_step=context.global_step,
            on_scored=on_scored,
        )
    try:
        path = publish_mislabel(context.writer(), context.output_dir, report, verbose=not args.quiet)
    finally:
        context.close()
    _exports(args, mislabel_to_dict(report), None)
    _done(context, path)
    return 0


# -- correct ---------------------------------------------------------------------------------------------------
def add_correct_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    slice_ = parser.add_argument_group("the slice to fix (validation examples)")
    slice_.add_argument("--anchor-indices", type=int, nargs="+", metavar="I", help="validation indices of the slice"
                        " (default: every validation example the checkpoint misclassifies)")
    slice_.add_argument("--anchor-label", type=int, metavar="C", help="keep only slice examples whose label is C"
                        " (e.g. the class the model confuses)")
    slice_.add_argument("--heldout-fraction", type=float, default=0.5, help="share of the slice held out to"
                        " measure the fix, never used as anchors (default: 0.5; 0 measures on the anchors only)")
    budget = parser.add_argument_group("budget and method (the correct_errors arguments of the same names)")
    budget.add_argument("--selection", default="helpful", choices=("helpful", "random", "anchors", "harmful"),
                        help="what to fine-tune on each round (default: helpful)")
    budget.add_argument("--iterations", type=int, default=10, help="rounds (default: 10)")
    budget.add_argument("--anchors-per-iteration", type=int, default=10, help="anchors sampled per round (default: 10)")
    budget.add_argument("--examples-per-iteration", type=int, default=10,
                        help="training examples chosen per round (default: 10)")
    budget.add_argument("--steps-per-iteration", type=int, default=1, help="optimizer steps per round (default: 1)")
    budget.add_argument("--lr", type=float, default=0.01, help="learning rate of the fresh optimizer (default: 0.01)")
    budget.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="fresh optimizer (default: sgd)")
    budget.add_argument("--solver", default="lissa", choices=("lissa", "cg", "exact"),
                        help="s_test solver (default: lissa)")
    budget.add_argument("--damping", type=float, default=0.01, help="lambda added to the Hessian (default: 0.01)")
    budget.add_argument("--seed", type=int, default=0, help="seeds the held-out split, anchor sampling and random"
                        " selection (default: 0)")
    parser.add_argument("--save-checkpoint", metavar="PATH", help="write the corrected weights as a checkpoint"
                        " (the input checkpoint with its state_dict replaced)")


def run_correct(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import Subset

    from lightning_influence.correct import correct_errors

    if not 0 <= args.heldout_fraction < 1:
        raise UsageError(f"Expected `--heldout-fraction` in [0, 1), but got {args.heldout_fraction}.")
    context = load_context(args)
    val_loader = _single(context.val_loader)
    slice_indices = _slice_indices(context, val_loader, args)
    order = torch.randperm(len(slice_indices), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held = int(round(args.heldout_fraction * len(slice_indices)))
    heldout = sorted(slice_indices[i] for i in order[:held])
    anchors = sorted(slice_indices[i] for i in order[held:])
    if not anchors:
        raise UsageError(f"The slice has {len(slice_indices)} example(s) and all are held out: lower"
                         " `--heldout-fraction` or pass more `--anchor-indices`.")
    trainer = _posthoc_trainer(args, context)
    loss_fn = _loss_fn(args, context)
    try:
        report = correct_errors(
            trainer, context.model, Subset(val_loader.dataset, anchors), train_dataloaders=context.train_loader,
            heldout=Subset(val_loader.dataset, heldout) if heldout else None, val_dataloaders=val_loader,
            iterations=args.iterations, anchors_per_iteration=min(args.anchors_per_iteration, len(anchors)),
            examples_per_iteration=args.examples_per_iteration, steps_per_iteration=args.steps_per_iteration,
            lr=args.lr, selection=args.selection, optimizer=args.optimizer, loss_fn=loss_fn, solver=args.solver,
            damping=args.damping, seed=args.seed, verbose=not args.quiet,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.save_checkpoint:
        meta = torch.load(context.checkpoint, map_location="cpu", weights_only=False)
        meta["state_dict"] = {k: v.detach().cpu() for k, v in context.model.state_dict().items()}
        Path(args.save_checkpoint).parent.mkdir(parents=True, exist_ok=True)
        torch.save(meta, args.save_checkpoint)
        print(f"Corrected checkpoint: {args.save_checkpoint}")
    print(f"Slice: {len(anchors)} anchor(s), {len(heldout)} held out; {len(report.iterations)} round(s) of"
          f" {args.selection!r} selection")
    print(f"Results: {context.output_dir / 'influence'}\nTensorBoard: tensorboard --logdir {context.output_dir}")
    return 0


def _slice_indices(context: PosthocContext, val_loader: Any, args: argparse.Namespace) -> list[int]:
    """The validation indices to fix: given ones, else the misclassified ones (optionally of one label)."""
    import torch

    from lightning_influence.core.batching import prepare_batch
    from lightning_influence.core.data import IndexedData
    from lightning_influence.core.params import analysis_mode
    from lightning_influence.explain import describe_batch

    val = IndexedData.from_loader(val_loader)
    device = torch.device(args.device)
    labels, predictions = [], []
    with analysis_mode(context.model):  # eval mode, restored afterwards
        descriptions = [describe_batch(context.model, prepare_batch(batch, device))
                        for _, batch in val.batches_with_indices(list(range(len(val))))]
    for description in descriptions:
        if description.labels is None or description.predictions is None:
            if args.anchor_indices:
                return _checked(args.anchor_indices, len(val))
            raise UsageError("Cannot tell which validation examples are misclassified (batches are not (input,"
                             " target) with class logits): pass `--anchor-indices`.")
        labels.append(description.labels.cpu())
        predictions.append(description.predictions.cpu())
    label, prediction = torch.cat(labels), torch.cat(predictions)
    if args.anchor_indices:
        chosen = _checked(args.anchor_indices, len(val))
    else:
        chosen = (label != prediction).nonzero().flatten().tolist()
    if args.anchor_label is not None:
        chosen = [i for i in chosen if int(label[i]) == args.anchor_label]
    if not chosen:
        raise UsageError("The slice is empty: the checkpoint misclassifies no validation example"
                         + (f" of label {args.anchor_label}" if args.anchor_label is not None else "")
                         + ". Pass `--anchor-indices`.")
    return chosen


def _checked(indices: list[int], size: int) -> list[int]:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise UsageError(f"`--anchor-indices` {bad} are outside the validation set (size {size}).")
    return sorted(set(indices))


def _posthoc_trainer(args: argparse.Namespace, context: PosthocContext) -> Any:
    """A one-device Trainer logging to the output directory (the post-hoc command runs in one process)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    accelerator = "gpu" if str(args.device).startswith("cuda") else "cpu"
    devices = [int(str(args.device).split(":")[1])] if ":" in str(args.device) else 1
    return pl.Trainer(accelerator=accelerator, devices=devices, logger=TensorBoardLogger(str(context.output_dir),
                      name="", version=""), enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=not args.quiet)


# -- verify-loo -----------------------------------------------------------------------------------------------
def add_verify_loo_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    group = parser.add_argument_group("the check (lightning_influence.verify_leave_one_out)")
    group.add_argument("--val-index", type=int, help="validation example to predict (default: the highest-loss one)")
    group.add_argument("--num-points", type=int, default=10, help="training examples removed one at a time, largest"
                       " |I| first (default: 10)")
    group.add_argument("--steps", type=int, default=50, help="full-batch L-BFGS steps of every retraining, warm-started"
                       " from the checkpoint (default: 50)")
    group.add_argument("--solver", default="exact", choices=("lissa", "cg", "exact"),
                       help="how the influence is computed (default: exact)")
    group.add_argument("--damping", type=float, default=0.01, help="lambda added to the Hessian; also the L2 of the"
                       " retraining objective unless --l2 is given (default: 0.01)")
    group.add_argument("--l2", type=float, help="L2 strength of the retraining objective (default: --damping)")


def run_verify_loo(args: argparse.Namespace) -> int:
    import torch

    from lightning_influence.core.batching import prepare_batch
    from lightning_influence.core.data import IndexedData
    from lightning_influence.core.params import analysis_mode
    from lightning_influence.loo import verify_leave_one_out
    from lightning_influence.reporting import write_json_atomic

    _check_exports(args)
    context = load_context(args)
    loss_fn = _loss_fn(args, context)
    val = IndexedData.from_loader(_single(context.val_loader))
    device = torch.device(args.device)
    if args.val_index is None:
        with analysis_mode(context.model), torch.no_grad():
            losses = torch.cat([loss_fn(context.model, prepare_batch(batch, device)).cpu()
                                for _, batch in val.batches_with_indices(list(range(len(val))))])
        val_index = int(losses.argmax())
    elif not 0 <= args.val_index < len(val):
        raise UsageError(f"`--val-index` {args.val_index} is outside the validation set (size {len(val)}).")
    else:
        val_index = args.val_index
    check = verify_leave_one_out(
        context.model, loss_fn, context.train_loader, prepare_batch(val.fetch([val_index]), device),
        num_points=args.num_points, steps=args.steps, solver=args.solver, damping=args.damping, l2=args.l2,
    )
    record = {"val_index": val_index, "train_indices": list(check.train_indices), "influence": check.influence.tolist(),
              "predicted_loss_change": check.predicted.tolist(), "actual_loss_change": check.actual.tolist(),
              "pearson": check.pearson, "spearman": check.spearman, "steps": check.steps, "solver": args.solver,
              "damping": args.damping, "train_size": check.train_size, "epoch": context.epoch,
              "global_step": context.global_step, "stage": STAGE}
    try:
        writer = context.writer()
        for name in ("pearson", "spearman"):
            if getattr(check, name) is not None:
                writer.add_scalar(f"influence/trust/loo_{name}", getattr(check, name), global_step=context.global_step)
        path = write_json_atomic(context.output_dir / "influence" / f"loo_epoch={context.epoch}.json", record)
    finally:
        context.close()
    if not args.quiet:
        print(f"Leave-one-out check, validation example {val_index}, {len(check.train_indices)} removals,"
              f" {check.steps} steps each: Pearson {check.pearson}, Spearman {check.spearman}")
    _done(context, path)
    return 0


def _loss_fn(args: argparse.Namespace, context: PosthocContext) -> Callable[[Any, Any], Any]:
    """``--loss-fn``, else the model's ``per_example_loss`` (resolved as the callback resolves it)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return context.make_callback(_flags(args, ()))._resolve_loss_fn(context.model)
    except MisconfigurationException as err:  # the model has no per_example_loss and no --loss-fn was given
        raise UsageError(str(err)) from err


# -- export ----------------------------------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="an epoch=N.json or mislabel_epoch=N.json written by the callback or this"
                        " command")
    parser.add_argument("--table", metavar="PATH", help="write a long table, .csv or .parquet (needs pandas)")
    parser.add_argument("--pif-json", metavar="PATH", help="write the top lists in pytorch-influence-functions'"
                        " layout (influence reports only)")
    parser.add_argument("--scores", metavar="PATH", help="the score index epoch=N-scores.json beside the report"
                        " (written with --save-scores / save_scores=True): adds every training example's"
                        " influence to --pif-json")


def run_export(args: argparse.Namespace) -> int:
    from lightning_influence.reporting import load_full_scores
    from lightning_influence.reporting.export import load_report

    if not args.table and not args.pif_json:
        raise UsageError("Nothing to export: pass `--table out.csv` (or .parquet) and/or `--pif-json out.json`.")
    _check_exports(args)
    report = load_report(args.report)
    scores = None
    if args.scores:
        val_indices, scores = load_full_scores(args.scores)
        if "points" not in report or val_indices != [p["val_index"] for p in report["points"]]:
            raise UsageError(f"`{args.scores}` holds scores for validation points {val_indices}, which are not the"
                             f" points of `{args.report}`: pass the score index of the same epoch.")
    _exports(args, report, scores)
    return 0


# -- shared ----------------------------------------------------------------------------------------------------
def _check_exports(args: argparse.Namespace) -> None:
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


@contextlib.contextmanager
def _progress(args: argparse.Namespace, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar of ``total`` units on stderr (nothing with ``--quiet``); yields ``advance(n)``."""
    if args.quiet or total <= 0:
        yield _ignore
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        yield advance


def _ignore(n: int = 1) -> None:
    """Progress sink that does nothing."""


def _single(loader: Any) -> Any:
    if isinstance(loader, (list, tuple)):
        if not loader:
            raise UsageError("The DataModule's val_dataloader() returned no loader: nothing to explain.")
        return loader[0]
    return loader


def _done(context: PosthocContext, path: Path) -> None:
    print(f"Results: {path}\nTensorBoard: tensorboard --logdir {context.output_dir}")
