"""What the package's callbacks share: Lightning's skip rules, failure isolation, one warning per trust code, the
writable-results check and the TensorBoard writers."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_influence.callbacks._trainer import Writers, log_dir_of


def should_skip_analysis(trainer: pl.Trainer) -> bool:
    """Lightning's skip rules (as ``ModelCheckpoint`` has them): no analysis in a ``fast_dev_run`` (a smoke test of
    the loop, not of the model), in the sanity check, or while the trainer is not fitting or validating. The answer
    is the same on every rank."""
    return bool(getattr(trainer, "fast_dev_run", False)) or trainer.sanity_checking or trainer.state.fn not in (
        TrainerFn.FITTING, TrainerFn.VALIDATING)


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

