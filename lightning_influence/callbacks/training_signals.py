"""Wiring proposal: record per-example training signals from Lightning, for the mislabel ranking.

A minimal :class:`TrainingSignalsCallback` around
:class:`~lightning_influence.analysis.training_signals.TrainingSignalRecorder`. Its hooks are small on purpose
so ``InfluenceCallback`` can call the same three pieces from its own hooks:

* ``setup`` (fit): choose the epochs (``checkpoints`` over ``trainer.max_epochs``, geometrically spaced by
  default: dense early, where memorising nets separate their flipped labels best) and build the recorder;
* ``on_train_epoch_end``: one forward-only pass over this rank's shard of the training set when the epoch is
  scheduled, assembled on rank 0 by dataset index; ``on_train_end`` adds the final weights when training
  stopped before the last scheduled epoch (early stopping). Both record inside ``isolate_rng``: a recording
  pass leaves the global random state as it found it, so the training (its shuffling, its dropout) is the
  same with and without the signals;
* ``state_dict`` / ``load_state_dict``: the recorder's state (on rank 0 the assembled tables), so a resumed
  run keeps the signals recorded before the checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_influence.analysis.training_signals import (
    DEFAULT_SCORE,
    DEFAULT_SPACING,
    OutputsFn,
    TrainingSignalRecorder,
    checkpoint_epochs,
    classification_outputs,
    relabel_records,
)
from lightning_influence.config import SIGNAL_MIN_BATCH_SIZE
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.reporting.relabel import confusion_records


def recording_batch_size(training_batch_size: int | None) -> int:
    """Examples per recording pass: the training batch size, at least :data:`SIGNAL_MIN_BATCH_SIZE`."""
    return max(training_batch_size or 0, SIGNAL_MIN_BATCH_SIZE)


def scheduled_epochs(max_epochs: int, checkpoints: int, spacing: str = DEFAULT_SPACING) -> list[int]:
    """The recorded epochs: :func:`~lightning_influence.analysis.training_signals.checkpoint_epochs`."""
    return checkpoint_epochs(max_epochs, checkpoints, spacing)


class TrainingSignalsCallback(pl.Callback):
    """Record loss, margin and EL2N of every training example at a few epochs; rank mislabel candidates.

    Args:
        checkpoints: number of recorded epochs over ``trainer.max_epochs`` (each costs one forward pass over the
            training set; ``docs/mislabel.md``).
        spacing: ``"geometric"`` (default: epochs ``max_epochs ** (i / (checkpoints - 1)) - 1``, dense early) or
            ``"even"`` (evenly spaced).
        every_n_epochs: record every N epochs instead (for runs without ``max_epochs``; -1 or None max_epochs
            with ``every_n_epochs=None`` records every epoch).
        train_dataset: the training data (default: the trainer's train dataloader's dataset and collate).
        batch_size: examples per forward pass (default: the training loader's batch size, at least
            ``SIGNAL_MIN_BATCH_SIZE`` = 256: the passes keep no gradients).
        outputs_fn: ``(module, batch) -> (logits [B, C], labels [B])`` (default: ``module(batch[0]), batch[1]``).
    """

    def __init__(
        self,
        checkpoints: int = 10,
        every_n_epochs: int | None = None,
        spacing: str = DEFAULT_SPACING,
        train_dataset: Dataset | None = None,
        batch_size: int | None = None,
        outputs_fn: OutputsFn | None = None,
    ) -> None:
        if checkpoints < 1:
            raise ValueError(f"Expected checkpoints >= 1, but got {checkpoints}.")
        checkpoint_epochs(1, 1, spacing)  # validates `spacing`
        self.checkpoints = checkpoints
        self.spacing = spacing
        self.every_n_epochs = every_n_epochs
        self.train_dataset = train_dataset
        self.batch_size = batch_size
        self.outputs_fn = outputs_fn or classification_outputs
        self.recorder: TrainingSignalRecorder | None = None
        self._data: IndexedData | None = None
        self._collectives: Collectives = SingleProcess()
        self._pending_state: dict[str, Any] | None = None
        self._rank = 0

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._rank = trainer.global_rank
        if trainer.world_size > 1:
            from lightning_influence.distributed.lightning import StrategyCollectives

            self._collectives = StrategyCollectives(trainer.strategy)

    def _ensure_recorder(self, trainer: pl.Trainer) -> TrainingSignalRecorder:
        if self.recorder is not None:
            return self.recorder
        self._data = self._train_data(trainer)
        max_epochs = trainer.max_epochs
        if self.every_n_epochs is None and max_epochs is not None and max_epochs > 0:
            recorder = TrainingSignalRecorder(len(self._data), epochs=scheduled_epochs(max_epochs, self.checkpoints,
                                                                                   self.spacing))
        else:
            every = self.every_n_epochs or 1
            recorder = TrainingSignalRecorder(len(self._data), every_n_epochs=every, start=every - 1)
        if self._pending_state is not None:
            recorder.load_state_dict(self._state_for_this_rank(self._pending_state))
            self._pending_state = None
        self.recorder = recorder
        return recorder

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder = self._ensure_recorder(trainer)
        assert self._data is not None
        if recorder.due(trainer.current_epoch):
            with isolate_rng(include_cuda=False):  # a DataLoader draws a seed: recording must not move training's
                recorder.record(pl_module, self._data, trainer.current_epoch, self._collectives,
                                self._device_outputs(pl_module))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder = self._ensure_recorder(trainer)
        last = trainer.current_epoch - 1  # Lightning has advanced the counter past the last finished epoch
        if last >= 0 and (not recorder.epochs_recorded or recorder.epochs_recorded[-1] < last):
            assert self._data is not None
            with isolate_rng(include_cuda=False):
                recorder.record(pl_module, self._data, last, self._collectives, self._device_outputs(pl_module),
                                force=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.recorder is None else {"recorder": self.recorder.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("recorder")
        if state is None:
            return
        if self.recorder is None:
            self._pending_state = state  # applied when the recorder is built (the dataset length is known then)
        else:
            self.recorder.load_state_dict(self._state_for_this_rank(state))

    # -- results (rank 0) --------------------------------------------------------------------------------------
    def scores(self, method: str = DEFAULT_SCORE) -> Any:
        """``Tensor[n_train]``, larger = more likely mislabelled (rank 0, after at least one record)."""
        if self.recorder is None:
            raise RuntimeError("No training signals yet: the callback records from the first training epoch on.")
        return self.recorder.scores(method)

    def relabel_records(self, count: int | None = None, method: str = DEFAULT_SCORE) -> list[dict[str, Any]]:
        """Rows ``{rank, train_index, given_label, predicted_label, score}``, most suspicious first."""
        assert self.recorder is not None and self.recorder.labels is not None
        return relabel_records(self.scores(method), self.recorder.labels, self.recorder.suggested_labels(), count)

    def confusion_records(self, count: int, method: str = DEFAULT_SCORE) -> list[dict[str, int]]:
        """Candidates per ``(given_label, predicted_label)`` pair among the top ``count``."""
        rows = self.relabel_records(count, method)
        return confusion_records([r["given_label"] for r in rows], [r["predicted_label"] for r in rows])

    # -- helpers -----------------------------------------------------------------------------------------------
    def _state_for_this_rank(self, state: dict[str, Any]) -> dict[str, Any]:
        """Every rank loads the same checkpoint; only rank 0 keeps the assembled tables."""
        if self._rank == 0:
            return state
        return {**state, "signals": {}, "probability_sum": None, "labels": None}

    def _device_outputs(self, pl_module: pl.LightningModule) -> OutputsFn:
        outputs_fn = self.outputs_fn

        def on_device(module: nn.Module, batch: Any) -> Any:
            return outputs_fn(module, move_data_to_device(batch, pl_module.device))

        return on_device

    def _train_data(self, trainer: pl.Trainer) -> IndexedData:
        loader = trainer.train_dataloader
        if self.train_dataset is not None:
            collate = loader.collate_fn if isinstance(loader, DataLoader) else None
            size = self.batch_size or recording_batch_size(loader.batch_size if isinstance(loader, DataLoader) else None)
            return IndexedData(self.train_dataset, collate, size)
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"TrainingSignalsCallback needs one training DataLoader over a map-style dataset, but got"
                f" {type(loader).__name__}. Pass `TrainingSignalsCallback(train_dataset=...)`."
            )
        return IndexedData.from_loader(loader, self.batch_size or recording_batch_size(loader.batch_size))
