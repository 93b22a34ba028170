"""The callback's leave-one-out spot check (``InfluenceCallback(verify_loo=m)``): rank zero only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from lightning_influence.analysis.leave_one_out import verify_leave_one_out
from lightning_influence.callbacks._damping_check import training_optimizer
from lightning_influence.callbacks.progress import progress_task
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.reporting.files import write_json_atomic
from lightning_influence.reporting.leave_one_out import (
    leave_one_out_summary,
    leave_one_out_to_dict,
    write_leave_one_out_scalars,
)
from lightning_influence.results import Explanation


def check_loo_arguments(count: Any, steps: Any, top_k: int, explains: bool) -> None:
    """``verify_loo`` (examples taken from the first point's harmful and helpful lists) and ``verify_loo_steps``.

    Raises:
        ValueError: naming the argument.
    """
    problems = [
        (explains or not count, "verify_loo", "0 without an explanation (num_worst=0)", count),
        (isinstance(count, int) and 0 <= count <= 2 * top_k, "verify_loo",
         f"an int in [0, 2 * top_k = {2 * top_k}] (examples taken from the harmful and helpful lists)", count),
        (isinstance(steps, int) and steps >= 1, "verify_loo_steps", "a positive int", steps),
    ]
    for ok, name, allowed, value in problems:
        if not ok:
            raise ValueError(f"Expected `{name}` to be {allowed}, but got {value!r}.")


def leave_one_out_check(trainer: pl.Trainer, module: pl.LightningModule, loss_fn: LossFn, explanation: Explanation,
                        epoch: int, log_dir: Path, *, train: IndexedData, val: IndexedData, writer: Any, count: int,
                        steps: int, verbose: bool) -> None:
    """Retrain without each of the ``count`` strongest examples of the first explained point; log the agreement.

    Uses the trainer's first optimiser class and hyperparameters, warm-started from the analysed weights.
    Writes ``influence/trust/loo_{pearson,spearman}`` scalars and ``influence/loo_epoch={epoch}.json``.
    """
    optimizers = getattr(trainer, "optimizers", None) or []
    if not explanation.points or not optimizers:
        return
    point = explanation.points[0]
    pairs = {i.train_index: i.influence for i in (*point.harmful, *point.helpful)}
    chosen = sorted(pairs, key=lambda index: -abs(pairs[index]))[:count]
    template = optimizers[0]
    optimizer = training_optimizer(trainer, module)  # the trainer has one: a factory of its like
    assert optimizer is not None
    steps_total = (len(chosen) + 1) * steps
    with isolate_rng(), progress_task(trainer, "influence: leave-one-out retraining", steps_total) as on_step:
        check = verify_leave_one_out(
            module, loss_fn, train.loader(), val.fetch([point.val_index]), train_indices=chosen,
            influences=[pairs[i] for i in chosen], steps=steps,
            optimizer=optimizer, l2=0.0, on_step=on_step,
        )
    write_leave_one_out_scalars(writer, check, trainer.global_step)
    writer.flush()
    write_json_atomic(log_dir / "influence" / f"loo_epoch={epoch}.json", leave_one_out_to_dict(
        check, point.val_index, damping=explanation.solver.damping, optimizer=type(template).__name__,
        epoch=epoch, global_step=trainer.global_step))
    if verbose:
        rank_zero_info(leave_one_out_summary(check, point.val_index, type(template).__name__))
