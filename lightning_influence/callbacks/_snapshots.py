"""Weight snapshots along a fit, for influence averaged over the training trajectory (``snapshots=K``)."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_influence.core.trajectory import Snapshot, snapshot_epochs, take_snapshot


class SnapshotSchedule:
    """Takes ``count - 1`` CPU copies of the weights at epoch ends spread evenly over the fit; the analysis at fit
    end averages over them and the final weights.

    With ``max_epochs`` set, the copies are taken after the epochs of
    :func:`~lightning_influence.core.trajectory.snapshot_epochs`. Without it (``max_epochs=-1``, early stopping
    alone), every epoch end is kept until ``2 (K - 1)`` copies are held, then every other one is dropped, and the
    analysis takes ``K - 1`` copies evenly spaced over the ones held. An analysis during training uses the copies taken before it.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.taken: list[tuple[int, Snapshot]] = []  # (global step, weights)

    def reset(self) -> None:
        self.taken = []

    def planned(self, max_epochs: int | None) -> set[int]:
        """The 0-based epochs after which a copy is taken (empty when ``max_epochs`` is not set)."""
        return snapshot_epochs(max_epochs, self.count)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.count <= 1:
            return
        epoch, max_epochs = trainer.current_epoch, trainer.max_epochs
        bounded = max_epochs is not None and max_epochs >= 1
        if bounded and epoch not in self.planned(max_epochs):
            return
        self.taken.append((trainer.global_step, take_snapshot(pl_module)))
        if not bounded and len(self.taken) > 2 * (self.count - 1):
            self.taken = self.taken[1::2]

    def before(self, global_step: int) -> list[Snapshot]:
        """At most ``count - 1`` copies taken before ``global_step``, evenly spaced over those held."""
        earlier = [snapshot for step, snapshot in self.taken if step < global_step]
        if len(earlier) <= self.count - 1:
            return earlier
        # the final weights stand at position len(earlier): the K points spaced evenly up to it
        picks = sorted({max(0, round(len(earlier) * k / self.count) - 1) for k in range(1, self.count)})
        return [earlier[i] for i in picks]
