"""``damping="self_check"`` in a Trainer: the training's optimiser, epochs and batch size for the retrainings of
:mod:`lightning_influence.analysis.damping_check`, run once per fit and reused by its later analyses."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_influence.analysis.damping_check import (
    OptimizerFactory,
    SelfCheckUnaffordable,
    check_damping,
    check_points,
    precheck_affordable,
    retrain_on_halves,
)
from lightning_influence.callbacks._trainer import collectives_for, val_data, weight_decay
from lightning_influence.config import DEFAULT_DAMPING, SELF_CHECK_DAMPING, ProblemConfig
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.results import DampingCheck, Explanation, SolveInfo, TrustReport, TrustWarning

#: Minibatch size of the retrainings when the training's own loader is not known.
FALLBACK_BATCH_SIZE = 32


def training_optimizer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[OptimizerFactory]:
    """A factory of fresh optimisers like the training's first one (its class and its first parameter group's
    current hyperparameters, e.g. the learning rate a scheduler set), or None when there is none."""
    optimizers = list(getattr(trainer, "optimizers", None) or [])
    if not optimizers:
        try:
            configured: Any = pl_module.configure_optimizers()
        except Exception:  # noqa: BLE001 - a module without optimisers (e.g. validate-only): no retraining
            return None
        while isinstance(configured, (list, tuple)) and configured:
            configured = configured[0]
        if isinstance(configured, dict):
            configured = configured.get("optimizer")
        if not isinstance(configured, torch.optim.Optimizer):
            return None
        optimizers = [configured]
    first = optimizers[0]
    kind = type(first)
    accepted = inspect.signature(kind.__init__).parameters  # e.g. AdamW's defaults name more than it accepts
    hyper = {k: v for k, v in first.param_groups[0].items()
             if k != "params" and k in first.defaults and k in accepted}
    return lambda params: kind(params, **hyper)


def epochs_trained(trainer: pl.Trainer, stage: str) -> int:
    """Epochs of training behind the weights an analysis of ``stage`` sees (at least 1)."""
    return max(1, trainer.current_epoch + (1 if stage == "validation" else 0))


@dataclass(frozen=True)
class SkippedCheck:
    """``damping="self_check"`` skipped because its candidates' solves would not fit its budget (a large model on a
    large training set: each solve is a pass of curvature products over the whole set per step): the fit's analyses
    use ``damping="auto"``, and their solve records say so (``damping_requested="self_check"``, the rule and a
    warning naming the reason)."""

    reason: str
    epoch: int

    @property
    def rule(self) -> str:
        return f"self_check skipped at epoch {self.epoch} ({self.reason}); damping='auto' instead"


#: What a fit's self-check left: its choice, or the record of its skip.
SelfCheck = Union[DampingCheck, SkippedCheck]


def run_damping_check(trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, train: IndexedData,
                      val: IndexedData, problem: ProblemConfig, stage: str, epoch: int, train_loader: Any = None,
                      verbose: bool = True, strict: bool = False) -> Optional[SelfCheck]:
    """The self-check on this trainer's model (every rank runs it on the same seeds; rank zero's choice is used);
    a :class:`SkippedCheck` when its solves would not fit its budget (also under ``strict``: the default then runs
    at any size, and says what it did); None after a warning when it failed otherwise (the analysis then uses
    ``damping="auto"``; ``strict`` raises)."""
    try:
        return _damping_check(trainer, pl_module, loss_fn, train, val, problem, stage, epoch, train_loader, verbose)
    except SelfCheckUnaffordable as err:
        skipped = SkippedCheck(err.reason, epoch)
        rank_zero_warn(f"Influence: {skipped.rule}. Pass a number as `damping` to choose it yourself.")
        return skipped
    except Exception as err:  # noqa: BLE001 - the analysis goes on with the spectrum rule
        if strict:
            raise
        rank_zero_warn(f"damping='self_check' failed ({type(err).__name__}: {err}); this analysis uses"
                       " damping='auto' instead.")
        return None


def self_check_once(trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, train: IndexedData,
                    problem: ProblemConfig, chunk_size: int, stage: str, epoch: int, train_loader: Any,
                    verbose: bool, strict: bool) -> Optional[SelfCheck]:
    """:func:`run_damping_check` on the trainer's validation data (None without any: the analysis uses
    ``damping="auto"``)."""
    val = val_data(trainer, chunk_size, required=False)
    if val is None:
        return None
    return run_damping_check(trainer, pl_module, loss_fn, train, val, replace(problem, damping=DEFAULT_DAMPING), stage,
                             epoch, train_loader, verbose, strict)


def _damping_check(trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, train: IndexedData,
                   val: IndexedData, problem: ProblemConfig, stage: str, epoch: int, train_loader: Any,
                   verbose: bool) -> DampingCheck:
    optimizer = training_optimizer(trainer, pl_module)
    if optimizer is None:
        raise RuntimeError("damping='self_check' retrains with the training's optimiser, but the trainer has none and"
                           " `configure_optimizers()` returned none. Pass a number as `damping`, or damping='auto'.")
    epochs = max(1, round(epochs_trained(trainer, stage) / 2))
    batch_size = getattr(train_loader, "batch_size", None) or FALLBACK_BATCH_SIZE
    points = check_points(len(val))
    check_batch = val.fetch(points)
    if verbose:
        rank_zero_info(f"Influence: choosing the damping (self_check): retraining on random halves of the training"
                       f" set, {epochs} epoch(s) each, then scoring {len(points)} validation points per candidate.")
    # a model whose candidates' solves clearly cannot fit the budget fails here, before the retrainings' epochs
    precheck_affordable(pl_module, loss_fn, train, check_batch, problem, epochs=epochs, batch_size=batch_size)
    retrainings = retrain_on_halves(pl_module, loss_fn, train, check_batch, optimizer, epochs=epochs,
                                    batch_size=batch_size)
    check = check_damping(pl_module, loss_fn, train, check_batch, retrainings, problem)
    check = replace(check, epoch=epoch)
    collectives = collectives_for(trainer)
    if collectives.world_size > 1:
        check = collectives.gather_objects(check)[0]  # one choice on every rank
    return check


def analysis_problem(problem: ProblemConfig, trainer: pl.Trainer, check: Optional[SelfCheck]) -> ProblemConfig:
    """The config an analysis runs with: the weight decay of the trainer's optimizer when ``problem`` leaves it
    open, and ``damping="self_check"`` as ``check`` chose (``"auto"`` while there is no check)."""
    if problem.weight_decay is None:
        problem = replace(problem, weight_decay=weight_decay(trainer))
    if problem.damping != SELF_CHECK_DAMPING:
        return problem
    return replace(problem, damping=check.chosen if isinstance(check, DampingCheck) else DEFAULT_DAMPING)


def with_check(info: SolveInfo, check: Optional[SelfCheck]) -> SolveInfo:
    """The solve record naming the self-check behind its damping (or its skip, before the rule it fell back on)."""
    if check is None:
        return info
    if isinstance(check, SkippedCheck):
        return replace(info, damping_requested=SELF_CHECK_DAMPING, damping_rule=f"{check.rule}: {info.damping_rule}",
                       warnings=(*info.warnings, f"{check.rule}."))
    return replace(info, damping_requested=SELF_CHECK_DAMPING, damping_rule=check.rule, damping_check=check)


#: The trust warning that the self-check's choice outranks (a rule of thumb against a measurement).
BELOW_WEIGHT_DECAY = "damping_below_weight_decay"


def with_checked_trust(trust: Optional[TrustReport], check: Optional[SelfCheck]) -> Optional[TrustReport]:
    """``trust`` with its damping-below-weight-decay warning turned into an info note when the self-check chose the
    damping: its retrainings ran with the training's own optimiser, weight decay included, and predicted best at
    this damping, so the rule of thumb "damping >= weight decay" should not tell the user otherwise."""
    if trust is None or not isinstance(check, DampingCheck):  # none, or skipped: the damping came from a rule
        return trust
    notes = tuple(
        TrustWarning(w.code, f"damping={check.chosen:g} is below the training weight decay, and kept: the self-check's"
                     " retrainings (the training's own optimiser and weight decay) predicted best at it among"
                     f" {list(check.candidates)}.", "info") if w.code == BELOW_WEIGHT_DECAY else w
        for w in trust.warnings)
    return replace(trust, warnings=notes)


def checked_explanation(found: Explanation, check: Optional[SelfCheck]) -> Explanation:
    """An analysis's explanation naming the self-check behind its damping, in its solve record and its trust."""
    return replace(found, solver=with_check(found.solver, check), trust=with_checked_trust(found.trust, check))
