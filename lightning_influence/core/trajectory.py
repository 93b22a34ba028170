"""Influence averaged over weight snapshots taken along training.

A model stopped after a few epochs is not at a minimum, and the influence of one set of weights answers for
that point only. Averaging ``I_c(z, z_test) = -s_test^(c) . grad L_c(z)`` over snapshots ``c`` of the same run
(each with its own gradients and its own ``s_test``) predicts retraining better on the models users train:
measured in ``benchmarks/lds.py`` (``docs/retraining.md``). A snapshot is a CPU copy of every parameter and
buffer (BatchNorm statistics included); :func:`using_weights` swaps one into the model and restores the
model's own weights afterwards, so the analysis leaves training exactly as it found it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from lightning_influence.core.scoring import Scorer
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.modes import model_tensors, state_snapshot
from lightning_influence.results import SolveInfo

#: name -> tensor of every parameter and buffer (``parameter <name>`` / ``buffer <name>``).
Snapshot = dict[str, torch.Tensor]


def snapshot_epochs(max_epochs: int | None, count: int) -> set[int]:
    """The 0-based epochs after which to copy the weights so that ``count`` points, the final weights included,
    spread evenly over ``max_epochs``: the ends of epochs ``ceil(E k / K)`` (1-based, ``k < K``), e.g. after
    epochs 5 and 10 of 15 for ``K=3``. Empty when ``max_epochs`` is not set."""
    if not max_epochs or max_epochs < 1:
        return set()
    return {math.ceil(max_epochs * k / count) - 1 for k in range(1, count)} - {max_epochs - 1}


def take_snapshot(model: nn.Module, device: torch.device | str = "cpu") -> Snapshot:
    """Copies of every parameter and buffer of ``model`` on ``device`` (CPU by default: no accelerator memory)."""
    return state_snapshot(model, device)


def check_snapshot(model: nn.Module, snapshot: Snapshot) -> None:
    """Raise when ``snapshot`` does not fit ``model`` (other names or shapes): it was taken of another model."""
    own = model_tensors(model)
    wrong = sorted(set(own) ^ set(snapshot))
    wrong += [name for name, value in own.items() if name in snapshot and snapshot[name].shape != value.shape]
    if wrong:
        raise ValueError(
            f"Expected each weight snapshot to hold the model's own parameters and buffers, but {wrong[:5]} differ"
            " in name or shape. Take snapshots of this model (`take_snapshot(model)`) during the same training run."
        )


@contextlib.contextmanager
def using_weights(model: nn.Module, snapshot: Snapshot, own: Snapshot | None = None) -> Iterator[None]:
    """Run the block with ``snapshot``'s parameters and buffers in ``model``, then put the model's own back (``own``:
    a copy of them already taken, e.g. once for many swaps)."""
    tensors = model_tensors(model)
    saved = own if own is not None else state_snapshot(model)
    try:
        with torch.no_grad():
            for name, value in tensors.items():
                value.copy_(snapshot[name])
        yield
    finally:
        with torch.no_grad():
            for name, value in tensors.items():
                value.copy_(saved[name])


@dataclass
class SnapshotSolve:
    """One snapshot's part of an averaged influence: its weights, its problem and its ``s_test`` rows."""

    snapshot: Snapshot
    problem: Scorer
    s_vectors: torch.Tensor
    info: SolveInfo


class AveragedScores:
    """``I(z) = (I_now(z) + sum_c I_c(z)) / (1 + C)``: the current weights' scores averaged with each snapshot's,
    batch by batch (so the streaming top-k, the shards and the candidates work unchanged).

    ``scores`` takes the current weights' ``s_test`` like :meth:`InfluenceProblem.scores`; each snapshot's own
    ``s_test`` was solved before (:class:`SnapshotSolve`), its gradients are taken with its weights swapped in.
    """

    def __init__(self, current: Scorer, model: nn.Module, members: Sequence[SnapshotSolve]) -> None:
        self.current, self.model, self.members = current, model, list(members)

    def scores(self, s_vectors: torch.Tensor, batches: Iterable[Batch] | None = None, method: str = "auto",
               chunk_size: int = 256) -> Iterator[torch.Tensor]:
        if batches is None:
            batches = self.current.train_loader  # type: ignore[attr-defined]
        count = 1 + len(self.members)
        own = state_snapshot(self.model)  # the current weights, put back after every swap
        for batch in batches:
            total = list(self.current.scores(s_vectors, [batch], method, chunk_size))
            for member in self.members:
                with using_weights(self.model, member.snapshot, own):
                    blocks = list(member.problem.scores(member.s_vectors, [batch], method, chunk_size))
                if [b.shape for b in blocks] != [t.shape for t in total]:
                    raise RuntimeError("A weight snapshot scored a batch in other blocks than the current weights.")
                total = [t + b for t, b in zip(total, blocks)]
            yield from (t / count for t in total)


def joined_verdict(info: SolveInfo, members: Sequence[SnapshotSolve]) -> SolveInfo:
    """The current weights' solve record with every snapshot's verdict joined in: converged only when all
    converged, the residual the worst of them; ``settings["snapshots"]`` lists each snapshot's residual, verdict
    and steps."""
    solves = [member.info for member in members]
    residuals = [i.residual for i in (info, *solves) if i.residual is not None]
    return replace(
        info, converged=info.converged and all(i.converged for i in solves),
        residual=max(residuals) if residuals else None,
        settings={**(info.settings or {}), "snapshots": [
            {"residual": i.residual, "converged": i.converged, "iterations": i.iterations} for i in solves]})
