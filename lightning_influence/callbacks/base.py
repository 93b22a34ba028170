"""What the package's callbacks share: Lightning's skip rules, failure isolation, one warning per trust code, the
writable-results check and the TensorBoard writers."""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng

from lightning_influence.callbacks._trainer import Writers, check_loss_on_examples, check_picklable, log_dir_of
from lightning_influence.config import check_num_candidates
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.data import IndexedData


def should_skip_analysis(trainer: pl.Trainer) -> bool:
    """Lightning's skip rules (as ``ModelCheckpoint`` has them): no analysis in a ``fast_dev_run`` (a smoke test of
    the loop, not of the model), in the sanity check, or while the trainer is not fitting or validating. The answer
    is the same on every rank."""
    return bool(getattr(trainer, "fast_dev_run", False)) or trainer.sanity_checking or trainer.state.fn not in (
        TrainerFn.FITTING, TrainerFn.VALIDATING)


def last_epoch(trainer: pl.Trainer) -> int:
    """The index of the last finished training epoch (the label of an analysis after fit or on its weights)."""
    return max(trainer.current_epoch - 1, 0)


class AnalysisCallback(pl.Callback):
    """Base of the analysis callbacks: ``strict`` (re-raise instead of warning), the writers, warnings once."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self._warned: set[str] = set()  # trust warnings already shown (each code once per callback)
        self._writers = Writers()

    def _isolated(self, epoch: int, trainer: pl.Trainer, what: str, action: Any) -> Any:
        """``action()``; a failure warns, returns None and training goes on (``strict=True`` re-raises)."""
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - the user's training must survive a failed write
            if self.strict:
                raise
            rank = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
            warnings.warn(
                f"Influence analysis at epoch {epoch} (step {trainer.global_step}) failed{rank} while {what}:"
                f" {type(err).__name__}: {err}\nTraining goes on. Pass `strict=True` to the callback to raise instead.",
                stacklevel=2,
            )
            return None

    def _warn_once(self, warnings: Any) -> None:
        for warning in warnings:
            if warning.code in self._warned:
                continue
            self._warned.add(warning.code)
            text = f"Influence trust [{warning.code}]: {warning.message}"
            rank_zero_warn(text) if warning.severity == "warning" else rank_zero_info(text)

    # -- checks before training: a misconfiguration fails before any training is spent --------------------
    def _check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn) -> None:
        """In ``setup``: a picklable loss for spawned processes, trainable parameters, a writable results folder."""
        check_picklable(loss_fn, trainer)
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise MisconfigurationException(
                f"{type(self).__name__} explains the model through its trainable parameters, but"
                f" {type(pl_module).__name__} has none (every parameter has `requires_grad=False`). Unfreeze the"
                " layers to analyse."
            )
        if trainer.is_global_zero:
            self._check_writable(trainer)

    def _check_data(self, pl_module: pl.LightningModule, loss_fn: LossFn, train: IndexedData,
                    num_candidates: Optional[int] = None) -> None:
        """In ``on_train_start``: ``num_candidates`` against the training set, ``loss_fn`` on two examples. A
        ``TypeError``/``ValueError`` is a misconfiguration (raised); anything else may be transient (a warning)."""
        try:
            check_num_candidates(num_candidates, len(train))
            with isolate_rng():
                check_loss_on_examples(pl_module, loss_fn, train)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(str(err)) from err
        except Exception as err:  # noqa: BLE001 - the analyses will tell
            if self.strict:
                raise
            rank_zero_warn(f"{type(self).__name__} could not run `loss_fn` on two training examples before training"
                           f" ({type(err).__name__}: {err}); the analyses will likely fail too. Training goes on.")

    def _check_writable(self, trainer: pl.Trainer) -> None:
        """Warn before training when the results directory cannot be written (a fixable setup problem)."""
        log_dir = log_dir_of(trainer)  # rank zero only: no collective here
        target = log_dir / "influence"
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            message = (
                f"InfluenceCallback cannot write its results to {target} ({type(err).__name__}: {err}). Give the"
                " logger a writable directory, e.g. `Trainer(logger=TensorBoardLogger(save_dir=...))` or"
                " `Trainer(default_root_dir=...)`."
            )
            if self.strict:
                raise MisconfigurationException(message) from err
            rank_zero_warn(message + " Training goes on; the analyses will be skipped when writing fails.")

