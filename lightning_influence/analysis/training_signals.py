"""Per-example training signals recorded over a training run, and mislabel rankings built from them.

Pure torch (no Lightning). A :class:`TrainingSignalRecorder` is told, at the end of chosen epochs, to run
forward-only passes of the model over the training set (a map-style dataset behind
:class:`~lightning_influence.core.tensors.data.IndexedData`) and keeps, per training example and recorded epoch:

* ``loss``: the cross-entropy of the given label, ``-log p_y``;
* ``margin``: the logit margin ``z_y - max_{j != y} z_j`` (negative = the model prefers another class);
* ``el2n``: the error L2 norm ``||softmax(z) - e_y||_2`` (Paul et al. 2021);

plus the softmax probabilities (their running sum, for the suggested label, and each checkpoint's as float16,
for the count of wrong labels in :mod:`~lightning_influence.analysis.noise_count`). Memory on rank 0 only:
``3 x n_train x checkpoints`` floats, ``n_train x classes`` for the sum and ``n_train x classes x checkpoints``
half floats (10 checkpoints of 50,000 examples in 10 classes: 10 MB).

Under DDP each rank computes its own shard (every ``world_size``-th index) and the pieces are sent to rank 0
only (``torch.distributed.gather_object`` or the collectives' ``gather_objects_to_root`` when present), where
they are written into the full table by dataset index. Every rank must call :meth:`record` at the same epochs.

The checkpoint schedule is :func:`checkpoint_epochs`; the default mislabel score and the named rankings are in
:mod:`~lightning_influence.analysis.signal_scores`; the evidence and the math are in ``docs/mislabel.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.analysis.signal_scores import (  # noqa: F401 - re-exported: the scores' old home
    DEFAULT_SCORE,
    EARLY_FRACTION,
    component_scores,
    forgetting_score,
    rank_mean,
    separation_window,
    spread_weighted,
)
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.collectives import Collectives, SingleProcess

SIGNALS = ("loss", "margin", "el2n")
SPACINGS = ("geometric", "even")
DEFAULT_SPACING = "geometric"
OutputsFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]
_SIGNAL_ELEMENTS = 1 << 22  # logits turned into signals at once (each float64 temporary: 32 MB)


def classification_outputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, C], labels [B])`` of a ``(inputs, labels, ...)`` batch: ``model(inputs)`` and ``labels``."""
    inputs, labels = batch[0], batch[1]
    return model(inputs), labels


def example_signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss``, ``margin`` and ``el2n`` per example (float32), and the softmax probabilities ``probs``.

    ``loss = -log softmax(z)_y``, ``margin = z_y - max_{j != y} z_j``, ``el2n = ||softmax(z) - e_y||_2``.
    """
    return {name: value.cpu() for name, value in _signals_on_device(logits, labels).items()}


def _signals_on_device(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`example_signals` left on the logits' device (the recorder copies a checkpoint to the host once)."""
    _check_logits(logits)
    logits = logits.detach().double()
    labels = labels.detach().long().to(logits.device)
    log_probs = logits.log_softmax(dim=1)
    probs = log_probs.exp()
    given = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).to(probs.dtype)
    return {
        "loss": (-log_probs.gather(1, labels[:, None]).squeeze(1)).float(),
        "margin": (given - others).float(),
        "el2n": (probs - one_hot).norm(dim=1).float(),
        "probs": probs.float(),
    }


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"Expected logits of shape [batch, classes >= 2], but got {tuple(logits.shape)}.")


def checkpoint_epochs(max_epochs: int, checkpoints: int, spacing: str = DEFAULT_SPACING) -> list[int]:
    """The 0-based epochs at which to record ``checkpoints`` times in a run of ``max_epochs`` epochs.

    ``"geometric"`` (default): epochs ``round(max_epochs ** (i / (checkpoints - 1))) - 1`` for
    ``i = 0..checkpoints-1``, moved up to keep them distinct (dense early, where a net that memorises its flips
    separates them best, sparse late); ``"even"``: evenly spaced from 0 to ``max_epochs - 1``. Both end at the
    last epoch; with ``max_epochs <= checkpoints`` every epoch is recorded.
    """
    if max_epochs < 1 or checkpoints < 1:
        raise ValueError(f"Expected max_epochs >= 1 and checkpoints >= 1, but got {max_epochs} and {checkpoints}.")
    if spacing not in SPACINGS:
        raise ValueError(f"Expected `spacing` to be one of {SPACINGS}, but got {spacing!r}.")
    if checkpoints == 1:
        return [max_epochs - 1]
    if max_epochs <= checkpoints:
        return list(range(max_epochs))
    if spacing == "even":
        return sorted({round(i * (max_epochs - 1) / (checkpoints - 1)) for i in range(checkpoints)})
    epochs: list[int] = []
    for i in range(checkpoints):
        target = round(max_epochs ** (i / (checkpoints - 1))) - 1
        lowest = epochs[-1] + 1 if epochs else 0
        epochs.append(min(max(target, lowest), max_epochs - checkpoints + i))
    return epochs


def gather_to_root(collectives: Collectives, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, ``None`` on the others.

    Uses ``collectives.gather_objects_to_root`` when the implementation has it, else
    ``torch.distributed.gather_object`` when a process group is initialised (the Lightning DDP strategy and
    :class:`~lightning_influence.distributed.TorchDistributed` both run on one), else falls back to
    ``gather_objects`` (every rank receives the list; rank 0 keeps it).
    """
    if collectives.world_size == 1:
        return [obj]
    to_root = getattr(collectives, "gather_objects_to_root", None)
    if to_root is not None:
        return to_root(obj)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        group = getattr(collectives, "group", None)
        root = 0 if group is None else dist.get_global_rank(group, 0)
        out: list[Any] | None = [None] * collectives.world_size if collectives.rank == 0 else None
        dist.gather_object(obj, out, dst=root, group=group)
        return out
    gathered = collectives.gather_objects(obj)
    return gathered if collectives.rank == 0 else None


class TrainingSignalRecorder:
    """Records ``loss``, ``margin`` and ``el2n`` of every training example at chosen epochs.

    Args:
        num_train: number of training examples (the dataset's length).
        every_n_epochs: record at epochs ``start, start + every_n_epochs, ...`` (0-based epochs).
        epochs: record exactly at these epochs instead (overrides ``every_n_epochs``).
        start: first epoch recorded when ``epochs`` is not given.

    After the records, rank 0 holds ``signals[name]`` as ``[num_train, checkpoints]`` float32 tensors (NaN for
    an example not yet seen), ``epochs_recorded`` and ``probability_sum`` ``[num_train, classes]``; other ranks
    hold only the schedule. Scores: :meth:`scores` (larger = more likely mislabelled).
    """

    def __init__(
        self, num_train: int, every_n_epochs: int = 1, epochs: Sequence[int] | None = None, start: int = 0
    ) -> None:
        if num_train < 1:
            raise ValueError(f"Expected num_train >= 1, but got {num_train}.")
        if epochs is None and every_n_epochs < 1:
            raise ValueError(f"Expected every_n_epochs >= 1, but got {every_n_epochs}.")
        self.num_train = int(num_train)
        self.every_n_epochs = int(every_n_epochs)
        self.schedule = None if epochs is None else sorted({int(e) for e in epochs})
        self.start = int(start)
        self.epochs_recorded: list[int] = []
        self.signals: dict[str, torch.Tensor] = {}
        self.probability_sum: torch.Tensor | None = None
        self.probabilities: list[torch.Tensor] = []  # per checkpoint, [num_train, classes] float16 (rank 0)
        self.labels: torch.Tensor | None = None
        self.seconds = 0.0
        self._scores: tuple[Any, dict[str, torch.Tensor]] | None = None  # the last component_scores, by its inputs

    # -- schedule --------------------------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` is scheduled and not recorded yet."""
        if epoch in self.epochs_recorded:
            return False
        if self.schedule is not None:
            return epoch in self.schedule
        return epoch >= self.start and (epoch - self.start) % self.every_n_epochs == 0

    # -- recording -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def record(
        self,
        model: nn.Module,
        data: IndexedData,
        epoch: int,
        collectives: Collectives | None = None,
        outputs_fn: OutputsFn = classification_outputs,
        force: bool = False,
    ) -> bool:
        """Forward-only pass over this rank's shard at ``epoch`` if due (or ``force``); ``True`` if recorded.

        The model runs in ``eval()`` mode under ``no_grad`` and is put back in its previous mode. Collective:
        every rank must call it at the same epochs.
        """
        import time

        collectives = collectives or SingleProcess()
        if not (force or self.due(epoch)):
            return False
        if len(data) != self.num_train:
            raise ValueError(f"Expected a training set of {self.num_train} examples, but got {len(data)}.")
        began = time.perf_counter()
        indices = list(range(collectives.rank, self.num_train, collectives.world_size))
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        was_training = model.training
        model.eval()
        try:
            if indices:
                for batch_indices, batch in data.batches_with_indices(indices):
                    logits, labels = outputs_fn(model, batch)
                    _check_logits(logits)
                    parts.append((batch_indices, logits.detach(), labels.detach().long()))
        finally:
            model.train(was_training)
        if parts:  # the signals of the whole shard at once, copied to the host once (not per batch and signal)
            local_indices = torch.cat([p[0] for p in parts])
            all_logits, local_labels = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
            rows = max(1, _SIGNAL_ELEMENTS // all_logits.shape[1])  # bounded float64 temporaries on the device
            pieces = [_signals_on_device(all_logits[at : at + rows], local_labels[at : at + rows])
                      for at in range(0, len(all_logits), rows)]
            local = {name: torch.cat([piece[name] for piece in pieces]).cpu() for name in (*SIGNALS, "probs")}
            local_labels = local_labels.cpu()
        else:
            local_indices, local, local_labels = torch.zeros(0, dtype=torch.long), {}, torch.zeros(0, dtype=torch.long)
        self.add(epoch, local_indices, local, local_labels, collectives)
        self.seconds += time.perf_counter() - began
        return True

    def add(
        self,
        epoch: int,
        indices: torch.Tensor,
        values: dict[str, torch.Tensor],
        labels: torch.Tensor,
        collectives: Collectives | None = None,
    ) -> None:
        """Add one checkpoint from this rank's examples ``indices`` (``values`` from :func:`example_signals`).

        The per-rank pieces are gathered to rank 0 and written by dataset index. Collective.
        """
        collectives = collectives or SingleProcess()
        pieces = gather_to_root(collectives, (indices, values, labels))
        self.epochs_recorded.append(int(epoch))
        if pieces is None:
            return
        column = len(self.epochs_recorded) - 1
        for piece_indices, piece, piece_labels in pieces:
            if len(piece_indices) == 0:
                continue
            self._write(column, piece_indices.long(), piece, piece_labels.long())

    def _write(self, column: int, indices: torch.Tensor, piece: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        for name in SIGNALS:
            table = self.signals.get(name)
            if table is None or table.shape[1] <= column:
                grown = torch.full((self.num_train, column + 1), float("nan"))
                if table is not None:
                    grown[:, : table.shape[1]] = table
                self.signals[name] = table = grown
            table[indices, column] = piece[name].float()
        probs = piece["probs"].float()
        if self.probability_sum is None or self.probability_sum.shape[1] != probs.shape[1]:
            if self.probability_sum is not None:
                raise ValueError(f"Expected {self.probability_sum.shape[1]} classes, but got {probs.shape[1]}.")
            self.probability_sum = torch.zeros(self.num_train, probs.shape[1])
        self.probability_sum[indices] += probs
        while len(self.probabilities) <= column:
            self.probabilities.append(torch.full((self.num_train, probs.shape[1]), float("nan"), dtype=torch.float16))
        self.probabilities[column][indices] = probs.half()
        if self.labels is None:
            self.labels = torch.full((self.num_train,), -1, dtype=torch.long)
        self.labels[indices] = labels

    # -- results (rank 0) ------------------------------------------------------------------------------------
    def _require(self) -> None:
        if not self.signals:
            raise RuntimeError(
                "No training signals recorded on this process: record() has not run yet, or this is not rank 0"
                " (the signals are assembled on rank 0 only)."
            )

    def component_scores(self, early_fraction: float = EARLY_FRACTION) -> dict[str, torch.Tensor]:
        """Every named score, ``[num_train]`` each, larger = more likely mislabelled (rank 0).

        Kept until the tables change (a record, a load, any in-place write): one analysis asks for them several
        times, and the default's per-class sorts cost about a second per checkpoint at a million examples.
        """
        self._require()
        tables = [*self.signals.values(), *([] if self.labels is None else [self.labels])]
        key = (early_fraction, tuple(self.epochs_recorded), tuple((id(t), t._version) for t in tables))
        if self._scores is None or self._scores[0] != key:
            self._scores = (key, component_scores(self.signals, self.epochs_recorded, early_fraction, self.labels))
        return dict(self._scores[1])

    def scores(self, method: str = DEFAULT_SCORE) -> torch.Tensor:
        """The score ``method`` (default :data:`DEFAULT_SCORE`), ``[num_train]``, larger = more suspicious."""
        scores = self.component_scores()
        if method not in scores:
            raise ValueError(f"Expected a score in {sorted(scores)}, but got {method!r}.")
        return scores[method]

    def rankings(self) -> dict[str, torch.Tensor]:
        """Each named score as training indices, most suspicious first (stable: ties by index)."""
        return {name: torch.argsort(score, descending=True, stable=True) for name, score in self.component_scores().items()}

    def suggested_labels(self) -> torch.Tensor:
        """The most likely class *other than the given label*, ``[num_train]``.

        ``argmax_{j != y} sum_k softmax(z_k)_j`` over the recorded checkpoints: a memorising net ends up
        predicting the given label of every example, so the given label is left out; the runner-up averaged over
        training is the class a reviewer should check first.
        """
        self._require()
        assert self.probability_sum is not None and self.labels is not None
        given = self.labels.clamp(min=0)[:, None]
        return self.probability_sum.scatter(1, given, float("-inf")).argmax(dim=1)

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (the assembled tables live on rank 0; other ranks save the schedule)."""
        return {
            "num_train": self.num_train, "every_n_epochs": self.every_n_epochs, "schedule": self.schedule,
            "start": self.start, "epochs_recorded": list(self.epochs_recorded),
            "signals": {name: table.clone() for name, table in self.signals.items()},
            "probability_sum": None if self.probability_sum is None else self.probability_sum.clone(),
            "probabilities": [table.clone() for table in self.probabilities],
            "labels": None if self.labels is None else self.labels.clone(), "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_train"]) != self.num_train:
            raise ValueError(
                f"Expected saved training signals for {self.num_train} examples, but the checkpoint has"
                f" {state['num_train']}: the training set changed since the checkpoint."
            )
        self.every_n_epochs, self.schedule, self.start = state["every_n_epochs"], state["schedule"], state["start"]
        self.epochs_recorded = [int(e) for e in state["epochs_recorded"]]
        self.signals = {name: table.clone() for name, table in state["signals"].items()}
        self.probability_sum = None if state["probability_sum"] is None else state["probability_sum"].clone()
        self.probabilities = [table.clone() for table in state.get("probabilities", [])]
        self.labels = None if state["labels"] is None else state["labels"].clone()
        self.seconds = float(state.get("seconds", 0.0))


# -- records for reports --------------------------------------------------------------------------------------
def candidate_order(scores: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Indices by descending score (ties by index), the first ``count`` (default all)."""
    order = torch.argsort(torch.nan_to_num(scores, nan=float("-inf")), descending=True, stable=True)
    return order if count is None else order[:count]


def relabel_records(
    scores: torch.Tensor, given: torch.Tensor, predicted: torch.Tensor, count: int | None = None
) -> list[dict[str, Any]]:
    """Rows ``{rank, train_index, given_label, predicted_label, score}``, most suspicious first.

    ``count = None`` lists the whole training set. ``rank`` is 1-based (1 = most suspicious), as in every table,
    CSV and command the user reads.
    """
    order = candidate_order(scores, count)
    return [
        {"rank": position + 1, "train_index": int(i), "given_label": int(given[i]), "predicted_label": int(predicted[i]),
         "score": float(scores[i])}
        for position, i in enumerate(order.tolist())
    ]
