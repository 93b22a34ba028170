"""Influence-guided fine-tuning (FastIF, Guo et al. 2021, Sec. 6.3): the Lightning-free part.

One iteration: sample anchors ``A`` from the slice to fix, solve ``s = (H + damping I)^-1 grad L_A`` for
their mean loss ``L_A = 1/|A| sum_a L(a)``, score the candidate training examples by
``I(z, A) = -s . grad L(z)`` (negative = **helpful**: up-weighting z lowers the anchors' loss), and fine-tune
on the ``examples_per_iteration`` most helpful ones. ``selection`` swaps the choice for the baselines
(``"random"`` candidates, the ``"anchors"`` themselves, the most ``"harmful"`` examples) so they share the
same code and budget. Ranks talk only through a :class:`~lightning_influence.distributed.Collectives`; the
Lightning shell that makes the optimizer steps is :mod:`lightning_influence.correct`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_influence.config import CorrectionConfig, ExplainConfig, ProblemConfig, expect
from lightning_influence.core.per_example.losses import LossFn, check_per_example_losses
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers.neumann import repeat_seed
from lightning_influence.core.tensors.batching import Batch, describe_batch, prepare_batch
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.distributed.collectives import Collectives
from lightning_influence.distributed.scoring import find_candidates, score_training_set
from lightning_influence.distributed.sharding import gather_checked, shard
from lightning_influence.distributed.solve import solve_s_test
from lightning_influence.results import CorrectionIteration, CorrectionReport, Metrics, SolveInfo


def allowed_indices(train_indices: Optional[Sequence[int]], train_size: int) -> list[int]:
    """The training indices a run may choose from: all of them, or an explicit list (checked)."""
    if train_indices is None:
        return list(range(train_size))
    if isinstance(train_indices, (str, bytes)) or not isinstance(train_indices, Sequence):
        raise TypeError(f"Expected `train_indices` to be None or a sequence of training indices, but got"
                        f" {train_indices!r}.")
    indices = [int(i) for i in train_indices]
    outside = [i for i in indices if not 0 <= i < train_size]
    expect(not outside, "train_indices", f"indices into the training set (0 to {train_size - 1})", outside[:10])
    expect(len(set(indices)) == len(indices), "train_indices", "free of duplicates", "a list with repeated indices")
    return indices


def check_sizes(settings: CorrectionConfig, num_anchors: int, num_candidates: int) -> None:
    """Clear errors for data that cannot feed the run (empty anchors, too few candidates)."""
    expect(num_anchors > 0, "anchors", "a non-empty dataset of examples from the slice to fix", "an empty one",
            "Pass e.g. the misclassified validation examples of the slice.")
    if settings.selection != "anchors":
        expect(settings.examples_per_iteration <= num_candidates, "examples_per_iteration",
                f"at most the number of candidate training examples ({num_candidates})",
                settings.examples_per_iteration, "Lower it or pass more training data / candidates.")


def round_generator(seed: int, iteration: int) -> torch.Generator:
    """The sampling generator of round ``iteration``: a function of ``(seed, iteration)`` only (same on every rank)."""
    return torch.Generator().manual_seed(repeat_seed(seed, iteration))


def sample_anchors(num_anchors: int, per_iteration: int, generator: torch.Generator) -> list[int]:
    """``per_iteration`` distinct anchor indices (all of them, shuffled, if there are fewer)."""
    return torch.randperm(num_anchors, generator=generator)[:per_iteration].tolist()


def fetch(data: IndexedData, indices: Sequence[int], device: torch.device) -> Batch:
    return prepare_batch(data.fetch(indices), device)


def mean_loss(model: nn.Module, loss_fn: LossFn, batch: Batch, size: int) -> float:
    with analysis_mode(model), torch.no_grad():
        return float(check_per_example_losses(loss_fn(model, batch), size).mean())


def evaluate(model: nn.Module, loss_fn: LossFn, data: IndexedData, device: torch.device,
             collectives: Collectives) -> Metrics:
    """Mean loss and accuracy (argmax vs label) of ``data``, each rank a shard, summed over ranks."""

    def local_sums() -> torch.Tensor:
        sums = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, count, batches without labels
        with analysis_mode(model), torch.no_grad():
            for indices, batch in data.batches_with_indices(shard(range(len(data)), collectives.rank,
                                                                  collectives.world_size)):
                batch = prepare_batch(batch, device)
                losses = check_per_example_losses(loss_fn(model, batch), len(indices))
                info = describe_batch(model, batch)
                sums[0] += float(losses.double().sum())
                sums[2] += len(indices)
                if info.labels is None or info.predictions is None or info.labels.shape != info.predictions.shape:
                    sums[3] += 1
                else:
                    sums[1] += float((info.predictions == info.labels).sum())
        return sums

    _, gathered = gather_checked(collectives, local_sums)
    total = torch.stack(gathered).sum(0)
    count = int(total[2])
    expect(count > 0, "every evaluation set", "non-empty", "an empty one")
    accuracy = None if total[3] > 0 else float(total[1] / count)
    return Metrics(float(total[0] / count), accuracy, count)


def choose_examples(
    model: nn.Module, loss_fn: LossFn, train: IndexedData, anchor_batch: Batch, allowed: Sequence[int],
    settings: CorrectionConfig, setup: ProblemConfig, collectives: Collectives, generator: torch.Generator,
) -> tuple[list[int], Optional[list[float]], Optional[SolveInfo]]:
    """The training indices to fine-tune on this round, (helpful/harmful) their influence on the anchors and how
    the s_test solve went.

    Must be called on every rank with the same arguments: s_test repeats and candidate scoring are split over
    ranks, and every rank gets the same answer.
    """
    k = settings.examples_per_iteration
    if settings.selection == "random":
        picks = torch.randperm(len(allowed), generator=generator)[:k].tolist()
        return [int(allowed[i]) for i in picks], None, None
    problem = InfluenceProblem(model, loss_fn, train.loader(), setup)
    with analysis_mode(model):
        if settings.num_candidates is not None:  # FastIF: only the anchors' nearest neighbours (within the candidates)
            neighbours = find_candidates(model, anchor_batch, train, ExplainConfig(
                num_candidates=min(settings.num_candidates, len(train)), chunk_size=settings.chunk_size), collectives,
                problem.device, loss_fn)
            permitted = set(allowed)
            allowed = sorted(i for i in neighbours.indices.unique().tolist() if i in permitted)
            expect(len(allowed) >= k, "examples_per_iteration", f"at most the {len(allowed)} nearest-neighbour"
                   " candidates of this round's anchors", k, "Raise `num_candidates` (neighbours per anchor).")
        gradient = problem.gradients(anchor_batch).mean(dim=0, keepdim=True)  # grad of the anchors' mean loss
        s_vector, info = solve_s_test(problem, gradient, collectives, None)
        top, _, _ = score_training_set(problem, train, s_vector, ExplainConfig(
            top_k=k, scoring=settings.scoring, chunk_size=settings.chunk_size), collectives, None, indices=allowed)
    if settings.selection == "helpful":
        return top.helpful_indices[0].tolist(), top.helpful_scores[0].tolist(), info
    return top.harmful_indices[0].tolist(), top.harmful_scores[0].tolist(), info


class CorrectionRun:
    """The state of one run on one rank; the Lightning shell calls ``start``, then per round ``begin_round``
    (before its optimizer steps), ``step_batch`` (per step) and ``end_round`` (after them).

    Args:
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses.
        train: the training data (indices reported are indices into it).
        anchors: the slice examples to fix.
        eval_sets: name -> data evaluated before and after every round (e.g. ``heldout``, ``val``).
        allowed: training indices the run may choose from.
        settings: the run's settings.
        config, damping: the s_test solver.
    """

    def __init__(self, loss_fn: LossFn, train: IndexedData, anchors: IndexedData, eval_sets: dict[str, IndexedData],
                 allowed: Sequence[int], settings: CorrectionConfig, setup: ProblemConfig,
                 description: dict[str, Any]) -> None:
        check_sizes(settings, len(anchors), len(allowed))
        self.loss_fn, self.train, self.anchors, self.eval_sets = loss_fn, train, anchors, eval_sets
        self.allowed, self.settings, self.setup = list(allowed), settings, setup
        self.description = description
        self.before: dict[str, Metrics] = {}
        self.rounds: list[CorrectionIteration] = []
        self._round: dict[str, Any] = {}

    def evaluate_all(self, model: nn.Module, device: torch.device, collectives: Collectives) -> dict[str, Metrics]:
        return {name: evaluate(model, self.loss_fn, data, device, collectives) for name, data in self.eval_sets.items()}

    def start(self, model: nn.Module, device: torch.device, collectives: Collectives) -> None:
        self.before = self.evaluate_all(model, device, collectives)
        self.rounds = []

    def begin_round(self, model: nn.Module, device: torch.device, collectives: Collectives) -> None:
        iteration = len(self.rounds) + 1
        start = time.perf_counter()
        generator = round_generator(self.settings.seed, iteration)
        anchor_ids = sample_anchors(len(self.anchors), self.settings.anchors_per_iteration, generator)
        anchor_batch = fetch(self.anchors, anchor_ids, device)
        if self.settings.selection == "anchors":
            chosen, influence, source, info = anchor_ids, None, self.anchors, None
        else:
            try:
                chosen, influence, info = choose_examples(model, self.loss_fn, self.train, anchor_batch, self.allowed,
                                                          self.settings, self.setup, collectives, generator)
            except ValueError as err:  # e.g. CG meeting negative curvature once the steps left the minimum
                raise ValueError(f"Choosing the examples of round {iteration} failed: {err} (the model after"
                                 f" {iteration - 1} round(s) of steps may be far from a minimum: lower `lr`.)") from err
            source = self.train
        self._round = {"iteration": iteration, "anchor_ids": anchor_ids, "anchor_batch": anchor_batch, "start": start,
                       "chosen": chosen, "influence": influence, "batch": fetch(source, chosen, device), "info": info,
                       "anchor_loss_before": mean_loss(model, self.loss_fn, anchor_batch, len(anchor_ids))}

    def step_batch(self) -> Batch:
        """The examples of the current round (every optimizer step of the round uses them all)."""
        return self._round["batch"]

    def end_round(self, model: nn.Module, device: torch.device, collectives: Collectives) -> CorrectionIteration:
        r = self._round
        after = mean_loss(model, self.loss_fn, r["anchor_batch"], len(r["anchor_ids"]))
        metrics = self.evaluate_all(model, device, collectives)
        influence = None if r["influence"] is None else tuple(float(v) for v in r["influence"])
        info = r["info"]
        record = CorrectionIteration(r["iteration"], tuple(r["anchor_ids"]), tuple(int(i) for i in r["chosen"]),
                                     influence, r["anchor_loss_before"], after, metrics, time.perf_counter() - r["start"],
                                     None if info is None else float(info.damping),
                                     None if info is None or info.residual is None else float(info.residual),
                                     None if info is None else bool(info.converged))
        self.rounds.append(record)
        self._round = {}
        return record

    def report(self) -> CorrectionReport:
        return CorrectionReport(self.settings.selection, dict(self.description), dict(self.before), tuple(self.rounds))
