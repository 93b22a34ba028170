"""The mislabel analysis of ``MislabelCallback`` (and of ``InfluenceCallback``'s deprecated mislabel arguments):
the training signals it records during the run and the report ranked by them.

The recording is :class:`~lightning_influence.callbacks.training_signals.TrainingSignalsCallback`'s (the same
schedule, DDP assembly by dataset index on rank 0 and checkpoint state), run from the owning callback's
hooks on that callback's own training data, so the signals and the self-influence score the same examples.
A failure to record (a model whose outputs are not class logits, say) warns once and leaves the report ranked
by self-influence; training goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_influence.analysis.explain import Describe
from lightning_influence.analysis.mislabel import find_mislabel_candidates
from lightning_influence.analysis.training_signals import OutputsFn
from lightning_influence.callbacks._damping_check import SelfCheck, with_check
from lightning_influence.callbacks._trainer import collectives_for
from lightning_influence.callbacks.progress import progress_task
from lightning_influence.callbacks.training_signals import TrainingSignalsCallback, recording_batch_size
from lightning_influence.config import LowRankConfig, ProblemConfig
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.results import MislabelReport

#: ``mislabel_candidates`` meaning every training example (the JSON then ranks the whole training set).
ALL = "all"


def mislabel_count(value: Union[int, str]) -> Optional[int]:
    """``mislabel_candidates`` as a count: an int >= 0, or ``None`` for ``"all"``.

    Raises:
        ValueError: for anything else.
    """
    if value == ALL:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `mislabel_candidates` to be an int >= 0 or 'all', but got {value!r}.")
    return value


class _CallbackSignals(TrainingSignalsCallback):
    """``TrainingSignalsCallback``'s recording on data handed in by the influence callback (not the trainer's)."""

    def use(self, data: IndexedData) -> None:
        if self._data is None:  # the same examples, in recording batches (forward only: larger is cheaper)
            self._data = replace(data, batch_size=self.batch_size or recording_batch_size(data.batch_size))

    def _train_data(self, trainer: pl.Trainer) -> IndexedData:
        if self._data is None:
            raise RuntimeError("No training data handed to the training-signal recorder yet.")
        return self._data


class MislabelAnalysis:
    """What ``InfluenceCallback(mislabel_candidates=...)`` runs: signals during training, a report at analyses.

    Args:
        count: candidates to report (``None``: the whole training set; 0: off).
        rank: Lanczos eigenpairs of the self-influence.
        record: record training signals (``None``: whenever the analysis is on).
        checkpoints: recorded epochs, geometrically spaced over ``max_epochs`` (dense early; every epoch without
            ``max_epochs``).
        outputs_fn: ``(module, batch) -> (logits [B, C], labels [B])`` (default: ``module(batch[0]), batch[1]``).
    """

    def __init__(self, count: Optional[int], rank: int, record: Optional[bool], checkpoints: int,
                 outputs_fn: Optional[OutputsFn] = None) -> None:
        if not isinstance(checkpoints, int) or checkpoints < 1:
            raise ValueError(f"Expected `signal_checkpoints` to be a positive int, but got {checkpoints!r}.")
        self.count = count
        self.config = LowRankConfig(rank=rank)
        on = count != 0 if record is None else bool(record) and count != 0
        self.signals: Optional[_CallbackSignals] = _CallbackSignals(checkpoints, outputs_fn=outputs_fn) if on else None

    @property
    def enabled(self) -> bool:
        return self.count != 0

    # -- hooks (every rank) ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.signals is not None:
            self.signals.setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           data: Callable[[], IndexedData], strict: bool) -> None:
        self._record(trainer, pl_module, data, strict, "on_train_epoch_end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Callable[[], IndexedData],
                     strict: bool) -> None:
        self._record(trainer, pl_module, data, strict, "on_train_end")

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Callable[[], IndexedData],
                strict: bool, hook: str) -> None:
        signals = self.signals
        if signals is None:
            return
        try:
            signals.use(data())
            getattr(signals, hook)(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - the user's training must survive a failed recording
            if strict:
                raise
            self.signals = None
            rank_zero_warn(
                f"The mislabel analysis could not record training signals at epoch {trainer.current_epoch}"
                f" ({type(err).__name__}: {err}); the mislabel report ranks by self-influence alone. Training goes"
                " on. Pass `signals_outputs_fn=` a function (module, batch) -> (logits [B, C], labels [B]) for"
                " other batches, or `training_signals=False`."
            )

    def state_dict(self) -> dict[str, Any]:
        return {} if self.signals is None else self.signals.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.signals is not None and state:
            self.signals.load_state_dict(state)

    # -- the report (collective: every rank) ------------------------------------------------------------------
    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, train: IndexedData,
               setup: ProblemConfig, describe: Describe, epoch: int,
               damping_check: Optional[SelfCheck] = None) -> MislabelReport:
        """Self-influence of every training example (``setup``'s problem, solved by this analysis's low-rank
        inverse), ranked by the recorded signals when there are some; the solve record names ``damping_check``
        (the self-check that chose ``setup``'s damping) when there is one."""
        collectives = collectives_for(trainer)
        shard_size = len(range(collectives.rank, len(train), collectives.world_size))
        recorder = None if self.signals is None else self.signals.recorder
        with progress_task(trainer, "influence: self-influence", shard_size,
                           "curvature eigenpairs (Lanczos) and damping") as on_scored:
            report = find_mislabel_candidates(
                pl_module, loss_fn, train, replace(setup, solver=self.config), self.count, epoch=epoch,
                global_step=trainer.global_step, collectives=collectives, on_scored=on_scored, describe=describe,
                recorder=recorder,
            )
        return replace(report, solver=with_check(report.solver, damping_check))
