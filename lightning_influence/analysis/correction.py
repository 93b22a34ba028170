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

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_influence.analysis.correction_direction import anchor_direction, take_influence_step
from lightning_influence.analysis.correction_steps import (
    anchor_weight,
    example_gradients,
    guarded_top,
    influence_weights,
    match_decrease,
    project_away,
    project_each,
)
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


@dataclass
class Choice:
    """One round's choice: training indices, their influence on the anchors (influence selections), the loss
    weights of the chosen examples (None: equal), how the s_test solve went and the s_test rows (to reuse)."""

    indices: list[int]
    influence: Optional[list[float]] = None
    weights: Optional[list[float]] = None
    info: Optional[SolveInfo] = None
    s_vectors: Optional[torch.Tensor] = None


def choose_examples(  # long: the three choices (random, top-k, guarded) share the solve and the candidate set
    model: nn.Module, loss_fn: LossFn, train: IndexedData, anchor_batch: Batch, allowed: Sequence[int],
    settings: CorrectionConfig, setup: ProblemConfig, collectives: Collectives, generator: torch.Generator,
    guard_batch: Optional[Batch] = None, s_vectors: Optional[torch.Tensor] = None,
) -> Choice:
    """The training examples to fine-tune on this round (with ``"anchors+..."`` selections: besides the anchors).

    ``guard_batch`` (validation examples outside the slice) makes the helpful selections skip examples whose
    influence on the guard's mean loss is positive (they would raise it), filling up with the best of the
    summed influence when too few remain; ``"anchors+protect"`` swaps the two roles: the examples most helpful
    to the guard among those not harmful to the anchors (without a guard: the most helpful to the anchors).
    ``s_vectors`` (an earlier round's rows) skips the solve.
    Must be called on every rank with the same arguments: s_test repeats and candidate scoring are split over
    ranks, and every rank gets the same answer.
    """
    k = settings.examples_per_iteration
    if settings.selection in ("random", "anchors+random"):
        picks = torch.randperm(len(allowed), generator=generator)[:k].tolist()
        return Choice([int(allowed[i]) for i in picks])
    problem = InfluenceProblem(model, loss_fn, train.loader(), setup)
    info = None
    with analysis_mode(model):
        if settings.num_candidates is not None:  # FastIF: only the anchors' nearest neighbours (within the candidates)
            neighbours = find_candidates(model, anchor_batch, train, ExplainConfig(
                num_candidates=settings.num_candidates, chunk_size=settings.chunk_size), collectives,
                problem.device, loss_fn)
            permitted = set(allowed)
            allowed = sorted(i for i in neighbours.indices.unique().tolist() if i in permitted)
            expect(len(allowed) >= k, "examples_per_iteration", f"at most the {len(allowed)} nearest-neighbour"
                   " candidates of this round's anchors", k, "Raise `num_candidates` (neighbours per anchor).")
        if s_vectors is None:
            batches = [anchor_batch] if guard_batch is None else [anchor_batch, guard_batch]
            gradients = torch.cat([problem.gradients(b).mean(dim=0, keepdim=True) for b in batches])
            s_vectors, info = solve_s_test(problem, gradients, collectives, None)
        guarded = s_vectors.shape[0] > 1 and settings.selection != "harmful"
        top, _, shard_scores = score_training_set(problem, train, s_vectors, ExplainConfig(
            top_k=k, scoring=settings.scoring, chunk_size=settings.chunk_size, keep_full_scores=guarded),
            collectives, None, indices=allowed)
    if settings.selection == "harmful":
        return Choice(top.harmful_indices[0].tolist(), top.harmful_scores[0].tolist(), None, info, s_vectors)
    if guarded and shard_scores is not None:
        full = shard_scores
        _, shards = gather_checked(collectives, lambda: (full.train_indices, full.scores[:2]))
        indices, scores = guarded_top(torch.cat([i for i, _ in shards]), torch.cat([v for _, v in shards], dim=1), k,
                                      by_guard=settings.selection == "anchors+protect")
    else:
        indices, scores = top.helpful_indices[0].tolist(), top.helpful_scores[0].tolist()
    return Choice(indices, scores, influence_weights(scores) if settings.selection == "weighted" else None, info,
                  s_vectors)


def part_loss(loss_fn: LossFn, model: nn.Module, part: tuple[Batch, Optional[torch.Tensor], int]) -> torch.Tensor:
    """The mean loss of one part of a step: ``(batch, loss weights or None, size)``."""
    batch, weights, size = part
    losses = check_per_example_losses(loss_fn(model, batch), size)
    if weights is not None:
        losses = losses * weights.to(device=losses.device, dtype=losses.dtype)
    return losses.mean()


#: The baselines: no guard's influence filter, no protect projection.
BASELINES = ("random", "anchors", "anchors+random")


def correct_indices(model: nn.Module, loss_fn: LossFn, data: IndexedData, device: torch.device) -> list[int]:
    """Indices of ``data`` the model classifies correctly (all of them when the batches carry no labels); computed
    whole on every rank (the same answer everywhere)."""
    kept: list[int] = []
    with analysis_mode(model), torch.no_grad():
        for indices, batch in data.batches_with_indices(list(range(len(data)))):
            info = describe_batch(model, prepare_batch(batch, device))
            if info.labels is None or info.predictions is None or info.labels.shape != info.predictions.shape:
                kept.extend(int(i) for i in indices)
            else:
                kept.extend(int(i) for i, ok in zip(indices, (info.predictions == info.labels).tolist()) if ok)
    return kept


class CorrectionRun:
    """The state of one run on one rank; the Lightning shell calls ``start``, then per round ``begin_round``
    (before its optimizer steps), ``step_loss`` (per step) and ``end_round`` (after them).

    Args:
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses.
        train: the training data (indices reported are indices into it).
        anchors: the slice examples to fix.
        eval_sets: name -> data evaluated before and after every round (e.g. ``heldout``, ``val``).
        allowed: training indices the run may choose from.
        settings: the run's settings.
        setup: the s_test problem.
        description: the settings as the report shows them.
        guard: examples outside the slice to protect (``settings.guard_per_iteration`` of those the model gets
            right at the start are sampled per round); None or ``guard_per_iteration=0``: no guard.
    """

    def __init__(self, loss_fn: LossFn, train: IndexedData, anchors: IndexedData, eval_sets: dict[str, IndexedData],
                 allowed: Sequence[int], settings: CorrectionConfig, setup: ProblemConfig,
                 description: dict[str, Any], guard: Optional[IndexedData] = None) -> None:
        check_sizes(settings, len(anchors), len(allowed))
        self.loss_fn, self.train, self.anchors, self.eval_sets = loss_fn, train, anchors, eval_sets
        self.allowed, self.settings, self.setup = list(allowed), settings, setup
        self.description = description
        self.guard = guard if settings.guard_per_iteration > 0 else None
        self.guard_pool: list[int] = []
        self.s_vectors: Optional[torch.Tensor] = None  # the first round's s_test rows when reused
        self.before: dict[str, Metrics] = {}
        self.rounds: list[CorrectionIteration] = []
        self._round: dict[str, Any] = {}

    def evaluate_all(self, model: nn.Module, device: torch.device, collectives: Collectives) -> dict[str, Metrics]:
        return {name: evaluate(model, self.loss_fn, data, device, collectives) for name, data in self.eval_sets.items()}

    def start(self, model: nn.Module, device: torch.device, collectives: Collectives) -> None:
        self.before = self.evaluate_all(model, device, collectives)
        self.rounds, self.s_vectors = [], None
        if self.guard is not None and self.settings.selection not in BASELINES:
            self.guard_pool = correct_indices(model, self.loss_fn, self.guard, device)

    def begin_round(self, model: nn.Module, device: torch.device, collectives: Collectives) -> None:
        iteration = len(self.rounds) + 1
        start = time.perf_counter()
        generator = round_generator(self.settings.seed, iteration)
        anchor_ids = sample_anchors(len(self.anchors), self.settings.anchors_per_iteration, generator)
        anchor_batch = fetch(self.anchors, anchor_ids, device)
        parts: list[tuple[Batch, Optional[torch.Tensor], int]] = []  # (batch, loss weights or None, size)
        direction = None
        if self.settings.selection in ("anchors", "constrained"):
            choice = Choice(anchor_ids)
        elif self.settings.selection == "influence":  # the anchors, stepped along (H + damping I)^-1 grad L_A
            direction, info = anchor_direction(model, self.loss_fn, self.train, anchor_batch, self.setup, collectives)
            choice = Choice(anchor_ids, info=info)
            gc.collect()
        else:
            guard_batch = None
            if self.guard_pool and self.guard is not None:
                picks = torch.randperm(len(self.guard_pool), generator=generator)[: self.settings.guard_per_iteration]
                guard_batch = fetch(self.guard, [self.guard_pool[i] for i in picks.tolist()], device)
            try:
                choice = choose_examples(model, self.loss_fn, self.train, anchor_batch, self.allowed, self.settings,
                                         self.setup, collectives, generator, guard_batch, self.s_vectors)
            except ValueError as err:  # e.g. CG meeting negative curvature once the steps left the minimum
                raise ValueError(f"Choosing the examples of round {iteration} failed: {err} (the model after"
                                 f" {iteration - 1} round(s) of steps may be far from a minimum: lower `lr`.)") from err
            if self.settings.reuse_s_test:
                self.s_vectors = choice.s_vectors
            if choice.info is not None:  # the round's InfluenceProblem keeps its curvature (e.g. Gauss-Newton output
                gc.collect()  # Jacobians) in reference cycles: free it now, not when Python's collector gets to it
            weights = None if choice.weights is None else torch.tensor(choice.weights, dtype=torch.float64)
            parts.append((fetch(self.train, choice.indices, device), weights, len(choice.indices)))
        if self.settings.selection.startswith("anchors") or self.settings.selection == "constrained" \
                or direction is not None:
            parts.append((anchor_batch, None, len(anchor_ids)))
        self._round = {"iteration": iteration, "anchor_ids": anchor_ids, "anchor_batch": anchor_batch, "start": start,
                       "choice": choice, "parts": parts, "direction": direction, "anchor_weights": [], "protect_cosines": [],
                       "anchor_loss_before": mean_loss(model, self.loss_fn, anchor_batch, len(anchor_ids))}

    def prepare_step(self, model: nn.Module) -> None:
        """Before each optimizer step (outside the training forward): with ``project_replay``, the weight of the
        anchors' term for ``"anchors+..."`` selections, ``1 + max(0, -g_A . g_R / |g_A|^2)`` with ``g_A`` and
        ``g_R`` the gradients of the anchors' and the chosen examples' mean losses (eval mode, every trainable
        parameter): the step's gradient ``g_R + w g_A`` then has ``g_A . (g_R + w g_A) >= |g_A|^2``, i.e. it lowers
        the anchors' loss to first order at least as fast as a step on the anchors alone."""
        parts = self._round["parts"]
        if not (self.settings.project_replay and self.settings.selection.startswith("anchors+") and len(parts) == 2):
            return
        params = [p for p in model.parameters() if p.requires_grad]
        with analysis_mode(model):
            chosen, anchors = (part_loss(self.loss_fn, model, part) for part in parts)
            g_chosen = torch.autograd.grad(chosen, params, allow_unused=True)
            g_anchors = torch.autograd.grad(anchors, params, allow_unused=True)
        self._round["anchor_weights"].append(anchor_weight(g_anchors, g_chosen))

    def protect_sample(self, model: nn.Module, device: torch.device) -> Optional[tuple[Batch, int]]:
        """The ``protect_per_step`` guard examples (of those right before the run) the model still gets right with
        the largest loss at the current weights, as ``(batch, size)``; None without a guard (or when none is right)."""
        k = self.settings.protect_per_step
        if not k or self.guard is None or not self.guard_pool or self.settings.selection in (*BASELINES, "harmful"):
            return None  # the baselines have no guard pool; "harmful" is the sign check, left unconstrained
        kept: list[tuple[float, int]] = []
        with analysis_mode(model), torch.no_grad():
            for indices, batch in self.guard.batches_with_indices(self.guard_pool):
                batch = prepare_batch(batch, device)
                losses = check_per_example_losses(self.loss_fn(model, batch), len(indices)).double().cpu()
                info = describe_batch(model, batch)
                right = [True] * len(indices) if info.labels is None or info.predictions is None \
                    or info.labels.shape != info.predictions.shape else (info.predictions == info.labels).tolist()
                kept += [(float(v), int(i)) for v, i, ok in zip(losses.tolist(), indices, right) if ok]
        if not kept:
            return None
        kept.sort(key=lambda pair: (-pair[0], pair[1]))  # largest loss first, ties by index
        chosen = [i for _, i in kept[:k]]
        return fetch(self.guard, chosen, device), len(chosen)

    def protect_step(self, model: nn.Module, device: torch.device) -> None:
        """After the step's backward, before the optimizer step. ``"influence"``: the gradient becomes the round's
        influence direction (:func:`take_influence_step`). Then (``protect_per_step``): when the step would raise
        the protect sample's mean loss to first order (``g . g_P < 0`` for the step's gradient ``g`` and the
        sample's ``g_P``), remove ``g``'s component along ``g_P`` (A-GEM), and for ``"influence"`` rescale it to the
        anchors' first-order decrease again; every rank holds the same gradients and computes the same sample, so
        the step stays the same on every rank. The cosine is kept per step."""
        if not self._round:
            return
        reference = None
        if self._round["direction"] is not None:
            reference = take_influence_step(model, self._round["direction"])
        elif self.settings.selection == "constrained":  # the anchors' own gradient, kept to rescale after projecting
            reference = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
        sample = self.protect_sample(model, device)
        if sample is None:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        if self.settings.selection == "constrained":  # one constraint per protect example (GEM)
            cosine = project_each([p.grad for p in params], example_gradients(self.loss_fn, model, sample, params))
        else:
            with analysis_mode(model):
                g_protect = torch.autograd.grad(part_loss(self.loss_fn, model, (sample[0], None, sample[1])), params,
                                                allow_unused=True)
            cosine = project_away([p.grad for p in params], g_protect)
        self._round["protect_cosines"].append(cosine)
        if reference is not None and cosine < 0:
            match_decrease([p.grad for p in params], reference)

    def step_loss(self, model: nn.Module) -> torch.Tensor:
        """The loss of one optimizer step: the mean over the round's chosen examples (each weighted by its
        influence weight for ``"weighted"``), plus, for the ``"anchors+..."`` selections, the mean over the
        anchors (so the anchors pull at least as hard as with ``"anchors"``: weighted by :meth:`prepare_step`'s
        weight with ``project_replay``, and the chosen examples add a replay term)."""
        parts = self._round["parts"]
        weights = self._round["anchor_weights"]
        loss = None
        for i, part in enumerate(parts):
            term = part_loss(self.loss_fn, model, part)
            if i == 1 and weights:  # the anchors' term of an "anchors+..." selection
                term = term * weights[-1]
            loss = term if loss is None else loss + term
        assert loss is not None  # every selection fine-tunes on something
        return loss

    def end_round(self, model: nn.Module, device: torch.device, collectives: Collectives) -> CorrectionIteration:
        r = self._round
        after = mean_loss(model, self.loss_fn, r["anchor_batch"], len(r["anchor_ids"]))
        metrics = self.evaluate_all(model, device, collectives)
        choice = r["choice"]
        influence = None if choice.influence is None else tuple(float(v) for v in choice.influence)
        info = choice.info
        record = CorrectionIteration(r["iteration"], tuple(r["anchor_ids"]), tuple(int(i) for i in choice.indices),
                                     influence, r["anchor_loss_before"], after, metrics, time.perf_counter() - r["start"],
                                     None if info is None else float(info.damping),
                                     None if info is None or info.residual is None else float(info.residual),
                                     None if info is None else bool(info.converged),
                                     tuple(r["anchor_weights"]) if r["anchor_weights"] else None,
                                     tuple(r["protect_cosines"]) if r["protect_cosines"] else None)
        self.rounds.append(record)
        self._round = {}
        return record

    def report(self) -> CorrectionReport:
        return CorrectionReport(self.settings.selection, dict(self.description), dict(self.before), tuple(self.rounds))
