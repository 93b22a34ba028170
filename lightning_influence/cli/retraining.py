"""The subcommands that retrain from a checkpoint: ``correct`` (influence-guided fine-tuning) and ``verify-loo``
(leave-one-out retraining against the influence predictions)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from lightning_influence.cli.commands import (
    STAGE,
    check_exports,
    check_training_losses,
    progress_tasks,
    report_done,
    single_loader,
    tensorboard_hint,
)
from lightning_influence.cli.loading import PosthocContext, UsageError, load_context
from lightning_influence.cli.options import add_checkpoint_arguments, flags_of, number_or_auto
from lightning_influence.config import ANCHOR_SELECTIONS, DEFAULT_DAMPING, DEFAULT_SOLVER, SELECTIONS, SOLVERS, CorrectionConfig


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
    budget.add_argument("--selection", default=CorrectionConfig.selection, choices=SELECTIONS,
                        help=f"what to fine-tune on each round (default: {CorrectionConfig.selection})")
    budget.add_argument("--iterations", type=int, default=CorrectionConfig.iterations,
                        help=f"rounds (default: {CorrectionConfig.iterations})")
    budget.add_argument("--anchors-per-iteration", type=int, default=CorrectionConfig.anchors_per_iteration,
                        help=f"anchors sampled per round (default: {CorrectionConfig.anchors_per_iteration})")
    budget.add_argument("--examples-per-iteration", type=int, default=CorrectionConfig.examples_per_iteration,
                        help=f"training examples chosen per round (default: {CorrectionConfig.examples_per_iteration})")
    budget.add_argument("--steps-per-iteration", type=int, default=CorrectionConfig.steps_per_iteration,
                        help=f"optimizer steps per round (default: {CorrectionConfig.steps_per_iteration})")
    budget.add_argument("--lr", type=_lr, default=CorrectionConfig.lr, help="learning rate of the fresh optimizer, or"
                        " 'auto': a line search on the anchors before the first round (default:"
                        f" {CorrectionConfig.lr})")
    budget.add_argument("--optimizer", default=CorrectionConfig.optimizer, choices=("sgd", "adam"),
                        help=f"fresh optimizer (default: {CorrectionConfig.optimizer})")
    budget.add_argument("--guard-per-iteration", type=int, default=CorrectionConfig.guard_per_iteration,
                        help="validation examples outside the slice (ones the checkpoint gets right) sampled per"
                        " round; helpful selections skip training examples that would raise their loss (0: off;"
                        f" default: {CorrectionConfig.guard_per_iteration})")
    budget.add_argument("--reuse-s-test", action=argparse.BooleanOptionalAction, default=CorrectionConfig.reuse_s_test,
                        help="solve s_test in the first round only and reuse it (default:"
                        f" {'on' if CorrectionConfig.reuse_s_test else 'off'})")
    budget.add_argument("--project-replay", action=argparse.BooleanOptionalAction,
                        default=CorrectionConfig.project_replay, help="'anchors+...' selections: weight the anchors'"
                        " loss so the chosen examples cannot slow the anchors (default:"
                        f" {'on' if CorrectionConfig.project_replay else 'off'})")
    budget.add_argument("--protect-per-step", type=int, default=CorrectionConfig.protect_per_step,
                        help="influence selections: before each step, the guard examples still right with the largest"
                        " loss (this many) form a protect sample, and the step loses its component that would raise"
                        f" their loss (0: off; default: {CorrectionConfig.protect_per_step})")
    budget.add_argument("--solver", default=DEFAULT_SOLVER, choices=SOLVERS,
                        help="s_test solver (default: lissa)")
    budget.add_argument("--damping", type=number_or_auto, default=DEFAULT_DAMPING,
                        help=f"lambda added to the Hessian (default: {DEFAULT_DAMPING})")
    budget.add_argument("--seed", type=int, default=0, help="seeds the held-out split, anchor sampling and random"
                        " selection (default: 0)")
    parser.add_argument("--save-checkpoint", metavar="PATH", help="write the corrected weights as a checkpoint"
                        " (the input checkpoint with its state_dict replaced)")


def run_correct(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import Subset

    from lightning_influence.core.tensors.data import IndexedData
    from lightning_influence.correct import correct_errors

    if not 0 <= args.heldout_fraction < 1:
        raise UsageError(f"Expected `--heldout-fraction` in [0, 1), but got {args.heldout_fraction}.")
    context = load_context(args)
    val_loader = single_loader(context.val_loader)
    slice_indices = _slice_indices(context, val_loader, args)
    order = torch.randperm(len(slice_indices), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held = int(round(args.heldout_fraction * len(slice_indices)))
    heldout = sorted(slice_indices[i] for i in order[:held])
    anchors = sorted(slice_indices[i] for i in order[held:])
    if not anchors:
        raise UsageError(f"The slice has {len(slice_indices)} example(s) and all are held out: lower"
                         " `--heldout-fraction` or pass more `--anchor-indices`.")
    in_slice = set(slice_indices)
    others = [i for i in range(len(val_loader.dataset)) if i not in in_slice]  # the guard: never the slice
    trainer = _posthoc_trainer(args, context)
    loss_fn = _loss_fn(args, context)
    check_training_losses(context, loss_fn, IndexedData.from_loader(context.train_loader), args.device)
    try:
        report = correct_errors(
            trainer, context.model, Subset(val_loader.dataset, anchors), train_dataloaders=context.train_loader,
            heldout=Subset(val_loader.dataset, heldout) if heldout else None, val_dataloaders=val_loader,
            iterations=args.iterations, anchors_per_iteration=min(args.anchors_per_iteration, len(anchors)),
            examples_per_iteration=args.examples_per_iteration, steps_per_iteration=args.steps_per_iteration,
            lr=args.lr, selection=args.selection, optimizer=args.optimizer, loss_fn=loss_fn, solver=args.solver,
            damping=args.damping, seed=args.seed, verbose=not args.quiet, guard=Subset(val_loader.dataset, others),
            guard_per_iteration=args.guard_per_iteration, reuse_s_test=args.reuse_s_test,
            project_replay=args.project_replay, protect_per_step=args.protect_per_step,
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
    verdict = correction_verdict(report, args)
    if verdict:
        print(verdict)
    print(f"Results: {context.output_dir / 'influence'}\n{tensorboard_hint(context)}")
    return 0


def _lr(text: str) -> Any:
    """``--lr``: a positive number or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', but got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', but got {text!r}")
    return value


def correction_verdict(report: Any, args: argparse.Namespace) -> str:
    """A line when the run fixed nothing on the slice (no accuracy gained on the held-out part, or on the anchors
    without one), with the knobs that change how far it moves; empty otherwise."""
    measured = "heldout" if "heldout" in report.before else "anchors"
    before, after = report.before[measured].accuracy, report.after[measured].accuracy
    if before is None or after is None or after > before or not report.iterations:
        return ""
    changes = ", ".join(f"{name} {report.before[name].accuracy:.3f} -> {report.after[name].accuracy:.3f}"
                        for name in ("anchors", "heldout", "val") if name in report.before
                        and report.before[name].accuracy is not None and report.after[name].accuracy is not None)
    steps = args.iterations * args.steps_per_iteration
    lr = report.settings.get("lr", args.lr)
    anchors = f"the round's {len(report.iterations[0].anchor_indices)} sampled anchors"
    on = anchors if report.selection in ANCHOR_SELECTIONS else f"{args.examples_per_iteration} chosen training" \
        f" example(s){' and ' + anchors if report.selection.startswith('anchors+') else ''}"
    fitted = measured == "heldout" and (report.after["anchors"].accuracy or 0.0) > (report.before["anchors"].accuracy
                                                                                    or 0.0)
    return (f"Nothing fixed: {changes} (accuracy). The run took {steps} {args.optimizer} step(s) of lr {lr} in all,"
            f" each on {on}."
            + (" The anchors improved and the held-out part did not: a slice of several kinds of error (e.g. every"
               " misclassified validation example) gives the held-out part nothing in common with the anchors; pass"
               " --anchor-label or --anchor-indices for one kind." if fitted else "")
            + " To move the slice further raise --lr (e.g. tenfold), --steps-per-iteration or --iterations, or try"
            " --optimizer adam, and watch the validation accuracy; --selection random on the same budget shows what"
            " the influence selection adds.")


def _slice_indices(context: PosthocContext, val_loader: Any, args: argparse.Namespace) -> list[int]:
    """The validation indices to fix: given ones, else the misclassified ones (optionally of one label)."""
    import torch

    from lightning_influence.core.tensors.batching import describe_batch, prepare_batch
    from lightning_influence.core.tensors.data import IndexedData
    from lightning_influence.core.tensors.modes import analysis_mode

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
    group.add_argument("--steps", type=int, default=50, help="full-batch L-BFGS steps (up to 10 iterations each) of"
                       " every retraining, warm-started from the checkpoint; the report says whether the baseline had"
                       " settled enough to resolve the changes (default: 50)")
    group.add_argument("--solver", default="cg", choices=SOLVERS,
                       help="how the influence is computed (default: cg, to its tolerance; exact costs one curvature"
                       " product per parameter)")
    group.add_argument("--damping", type=number_or_auto, default=DEFAULT_DAMPING, help="lambda added to the curvature;"
                       f" also the L2 of the retraining objective unless --l2 is given (default: {DEFAULT_DAMPING})")
    group.add_argument("--l2", type=float, help="L2 strength of the retraining objective (default: the damping"
                       " used, 'auto' resolved to its number)")


def run_verify_loo(args: argparse.Namespace) -> int:
    import torch

    from lightning_influence.analysis.leave_one_out import verify_leave_one_out
    from lightning_influence.core.tensors.batching import prepare_batch
    from lightning_influence.core.tensors.data import IndexedData
    from lightning_influence.core.tensors.modes import analysis_mode
    from lightning_influence.reporting import write_json_atomic
    from lightning_influence.reporting.leave_one_out import (
        leave_one_out_summary,
        leave_one_out_to_dict,
        write_leave_one_out_scalars,
    )

    check_exports(args)
    context = load_context(args)
    loss_fn = _loss_fn(args, context)
    check_training_losses(context, loss_fn, IndexedData.from_loader(context.train_loader), args.device)
    val = IndexedData.from_loader(single_loader(context.val_loader))
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
    waiting = f"influence of every training example (solver {args.solver}, damping {args.damping})"
    with progress_tasks(args, ("verify-loo: retraining", (args.num_points + 1) * args.steps, waiting)) as (on_step,):
        check = verify_leave_one_out(
            context.model, loss_fn, context.train_loader, prepare_batch(val.fetch([val_index]), device),
            num_points=args.num_points, steps=args.steps, solver=args.solver, damping=args.damping, l2=args.l2,
            on_step=on_step, weight_decay=context.weight_decay,
        )
    record = leave_one_out_to_dict(check, val_index, solver=args.solver, damping_requested=args.damping,
                                   weight_decay=context.weight_decay,
                                   epoch=context.epoch, global_step=context.global_step, stage=STAGE)
    try:
        writer = context.writer()
        write_leave_one_out_scalars(writer, check, context.global_step)
        path = write_json_atomic(context.output_dir / "influence" / f"loo_epoch={context.epoch}.json", record)
    finally:
        context.close()
    print(leave_one_out_summary(check, val_index))
    report_done(context, path)
    return 0


def _loss_fn(args: argparse.Namespace, context: PosthocContext) -> Callable[[Any, Any], Any]:
    """``--loss-fn``, else the model's ``per_example_loss`` (resolved as the callback resolves it)."""
    return context.loss_fn(flags_of(args, ()).get("loss_fn"))
