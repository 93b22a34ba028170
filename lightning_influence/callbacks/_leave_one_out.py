"""The callback's leave-one-out spot check (``InfluenceCallback(verify_loo=m)``): rank zero only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from lightning_influence.analysis.leave_one_out import verify_leave_one_out
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.reporting.files import write_json_atomic
from lightning_influence.results import Explanation


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
    hyper = {key: template.param_groups[0][key] for key in template.defaults if key in template.param_groups[0]}
    with isolate_rng():
        check = verify_leave_one_out(
            module, loss_fn, train.loader(), val.fetch([point.val_index]), train_indices=chosen,
            influences=[pairs[i] for i in chosen], steps=steps,
            optimizer=lambda params: type(template)(params, **hyper), l2=0.0,
        )
    for name in ("pearson", "spearman"):
        value = getattr(check, name)
        if value is not None:
            writer.add_scalar(f"influence/trust/loo_{name}", value, global_step=trainer.global_step)
    writer.flush()
    write_json_atomic(log_dir / "influence" / f"loo_epoch={epoch}.json", {
        "val_index": point.val_index, "train_indices": list(check.train_indices),
        "influence": check.influence.tolist(), "predicted_loss_change": check.predicted.tolist(),
        "actual_loss_change": check.actual.tolist(), "pearson": check.pearson, "spearman": check.spearman,
        "steps": check.steps, "optimizer": type(template).__name__, "train_size": check.train_size,
    })
    if verbose:
        rank_zero_info(f"Leave-one-out check (val {point.val_index}, {len(chosen)} removals):"
                       f" Pearson {check.pearson}, Spearman {check.spearman}")
