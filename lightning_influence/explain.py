"""Explain validation points by training examples: the analysis the callback runs, on every rank.

Data flows one way: validation losses -> monitored points -> s_test -> training scores (a shard per rank)
-> merged top-k -> report records. Lightning-free: ranks talk only through a :class:`Collectives`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch
from torch import nn

from lightning_influence.core.batching import Batch, prepare_batch
from lightning_influence.core.candidates import (
    CandidateScoreCollector,
    FeatureFn,
    NearestNeighbours,
    Neighbours,
    batch_features,
    check_candidates,
    collect_candidate_scores,
    knn_faiss,
    merge_neighbours,
)
from lightning_influence.core.config import LissaConfig, SolveInfo, SolverConfig
from lightning_influence.core.data import IndexedData
from lightning_influence.core.losses import LossFn, check_per_example_losses
from lightning_influence.core.params import analysis_mode
from lightning_influence.core.problem import InfluenceProblem, lissa_info
from lightning_influence.core.scoring import StreamingTopK, TopInfluences, top_influences_of
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.reporting.images import looks_like_image
from lightning_influence.reporting.records import ExplainedPoint, Influencer, SolverSummary

#: Influence scores kept per monitored point for its histogram (a regular subsample beyond this).
MAX_HISTOGRAM_SCORES = 100_000

Describe = Callable[[nn.Module, Batch], "Description"]
T = TypeVar("T")


@dataclass(frozen=True)
class Description:
    """What the tables and grids show for a batch: inputs, labels and model predictions (any may be None)."""

    inputs: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    predictions: Optional[torch.Tensor]


def describe_batch(model: nn.Module, batch: Batch) -> Description:
    """Inputs/labels from ``(input, target, ...)`` tuples or dicts with usual key names; predictions by argmax."""
    inputs = labels = None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        inputs = batch[0]
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    elif isinstance(batch, dict):
        inputs = next((batch[k] for k in ("input", "inputs", "x", "image", "images", "features") if k in batch), None)
        labels = next((batch[k] for k in ("label", "labels", "y", "target", "targets") if k in batch), None)
    predictions = None
    if isinstance(inputs, torch.Tensor):
        with torch.no_grad():
            out = model(inputs)
        if isinstance(out, torch.Tensor) and out.dim() == 2:
            predictions = out.argmax(dim=1) if out.shape[1] > 1 else out[:, 0]
    return Description(inputs, labels, predictions)


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain and how to score. ``val_indices`` overrides ``num_worst``."""

    top_k: int = 10
    num_worst: int = 8
    val_indices: Optional[tuple[int, ...]] = None
    misclassified_only: bool = False
    scoring: str = "auto"
    chunk_size: int = 256
    keep_full_scores: bool = False
    candidates: Optional[int] = None
    knn_backend: str = "torch"
    feature_fn: Optional[FeatureFn] = None


@dataclass(frozen=True)
class Explanation:
    """The result; every rank gets the same one (only rank 0 should write it)."""

    points: tuple[ExplainedPoint, ...]
    solver: SolverSummary
    timings: dict[str, float]
    train_size: int
    full_scores: Optional[torch.Tensor] = None
    full_score_indices: Optional[torch.Tensor] = None


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Every ``world_size``-th index starting at ``rank``: disjoint shards that cover all, no padding."""
    return list(indices)[rank::world_size]


def gather_checked(
    collectives: Collectives, compute: Callable[[], T], share: Callable[[T], Any] = lambda value: value
) -> tuple[T, list[Any]]:
    """``compute()`` on this rank and every rank's ``share(result)`` in rank order; if any rank raised, all raise.

    A rank failing alone (a diverging LiSSA repeat, an out-of-memory error, a bad example in its shard) would
    leave the others blocked in the next collective until the process group's timeout, and the group broken
    afterwards. Each local step is therefore followed by this gather, which carries the failure to every rank.
    """
    error: Optional[BaseException] = None
    try:
        result: Any = compute()
        outcome: tuple[Any, Optional[str]] = (share(result), None)
    except Exception as err:  # noqa: BLE001 - re-raised below on this rank, reported on the others
        error, result = err, None
        outcome = (None, f"{type(err).__name__}: {err}")
    gathered = collectives.gather_objects(outcome)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (_, message) in enumerate(gathered) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"The influence analysis failed on rank {rank}, so every rank stops: {message}")
    return result, [value for value, _ in gathered]


def validation_losses(
    model: nn.Module, loss_fn: LossFn, val: IndexedData, device: torch.device, collectives: Collectives
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-example losses (and predictions) of the whole validation set, each rank a shard, gathered."""

    def local_losses() -> list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        local = []
        for indices, batch in val.batches_with_indices(shard(range(len(val)), collectives.rank, collectives.world_size)):
            batch = prepare_batch(batch, device)
            with torch.no_grad():
                losses = check_per_example_losses(loss_fn(model, batch), len(indices))
            predictions = describe_batch(model, batch).predictions
            local.append((indices, losses.detach().cpu(), None if predictions is None else predictions.cpu()))
        return local

    _, gathered = gather_checked(collectives, local_losses)
    parts = [part for rank_parts in gathered for part in rank_parts]
    if not parts:
        raise ValueError("Expected a non-empty validation set to pick points to explain, but it has no examples.")
    indices = torch.cat([p[0] for p in parts])
    order = indices.argsort()
    losses = torch.cat([p[1] for p in parts])[order]
    has_predictions = all(p[2] is not None for p in parts)
    predictions = torch.cat([p[2] for p in parts])[order] if has_predictions else None
    return indices[order], losses, predictions


def select_points(
    settings: ExplainSettings, val: IndexedData, losses: torch.Tensor, predictions: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
) -> list[int]:
    """The validation indices to explain: the given ones, or the highest-loss (misclassified) examples."""
    if settings.val_indices is not None:
        outside = [i for i in settings.val_indices if not 0 <= i < len(val)]
        if outside:
            raise ValueError(
                f"Expected `val_indices` to be indices into the validation dataset (0 to {len(val) - 1}), but got"
                f" {outside}. Pick indices below {len(val)}, or leave `val_indices` unset to explain the worst points."
            )
        return list(settings.val_indices)
    candidates = torch.ones_like(losses, dtype=torch.bool)
    if settings.misclassified_only and predictions is not None and labels is not None:
        candidates = predictions != labels
    ranked = torch.where(candidates, losses, torch.full_like(losses, -float("inf"))).argsort(descending=True, stable=True)
    count = min(settings.num_worst, int(candidates.sum()))
    return ranked[:count].tolist()


def solve_s_test(
    problem: InfluenceProblem, gradients: torch.Tensor, collectives: Collectives, on_step: Callable[[], None] | None
) -> tuple[torch.Tensor, SolveInfo]:
    """s_test; LiSSA repeats are split over ranks (rank r runs r, r+R, ...) and combined by one sum.

    The traces come back in repeat order whatever the split, so ``trace`` row i is repeat i.
    """
    config = problem.config
    if not isinstance(config, LissaConfig):
        result = problem.solve(gradients, on_step)
        return result.vectors, result.info
    start = time.perf_counter()
    ids = list(range(collectives.rank, config.repeats, collectives.world_size))
    (partial, _), gathered = gather_checked(
        collectives, lambda: problem.lissa_partial(gradients, ids, on_step), lambda result: list(zip(ids, result[1]))
    )
    vectors = collectives.sum(partial) / config.repeats
    all_traces = [trace for _, trace in sorted((pair for pairs in gathered for pair in pairs), key=lambda p: p[0])]
    info = lissa_info(problem.damping, problem.lissa_scale(), all_traces, config)
    return vectors, SolveInfo(**{**info.__dict__, "seconds": time.perf_counter() - start})


def score_training_set(
    problem: InfluenceProblem, train: IndexedData, s_vectors: torch.Tensor, settings: ExplainSettings,
    collectives: Collectives, on_chunk: Callable[[int], None] | None,
) -> tuple[TopInfluences, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Top-k over this rank's shard merged across ranks; histogram sample and (optionally) full scores."""
    local_indices = shard(range(len(train)), collectives.rank, collectives.world_size)
    step = max(1, -(-len(train) // MAX_HISTOGRAM_SCORES))

    def score_shard() -> tuple[TopInfluences, torch.Tensor, torch.Tensor]:
        top = StreamingTopK(s_vectors.shape[0], settings.top_k)
        kept_scores = [s_vectors.new_empty((s_vectors.shape[0], 0), device="cpu")]  # a shard may be empty
        kept_indices = [torch.empty(0, dtype=torch.long)]
        for indices, batch in train.batches_with_indices(local_indices):
            position = 0
            for block in problem.scores(s_vectors, [batch], settings.scoring, settings.chunk_size):
                block_indices = indices[position : position + block.shape[1]]
                position += block.shape[1]
                top.update(block, block_indices)
                keep = slice(None) if settings.keep_full_scores else (block_indices % step == 0)
                kept_scores.append(block.cpu()[:, keep])
                kept_indices.append(block_indices[keep])
                if on_chunk is not None:
                    on_chunk(block.shape[1])
        return top.result(), torch.cat(kept_scores, 1), torch.cat(kept_indices)

    _, merged_top = gather_checked(collectives, score_shard)
    scores = torch.cat([m[1] for m in merged_top], dim=1)
    indices = torch.cat([m[2] for m in merged_top])
    order = indices.argsort()
    scores, indices = scores[:, order], indices[order]
    merged = merge_top_influences([m[0] for m in merged_top], settings.top_k)
    return merged, scores, (scores if settings.keep_full_scores else None)


def block_shard(n: int, block: int, rank: int, world_size: int) -> list[int]:
    """Indices of the fixed blocks ``[b * block, (b + 1) * block)`` with ``b = rank (mod world_size)``.

    Every example lands in the same block whatever the world size, so batch-dependent float results (features
    of a batch) are identical on any number of ranks.
    """
    return [i for start in range(rank * block, n, world_size * block) for i in range(start, min(start + block, n))]


def find_candidates(
    model: nn.Module, test_batch: Batch, train: IndexedData, settings: ExplainSettings, collectives: Collectives,
    device: torch.device,
) -> Neighbours:
    """Each test point's ``settings.candidates`` nearest training examples in feature space, the same on every
    rank and for every world size: features in fixed blocks (split over ranks), local exact kNN, one merge."""
    k = check_candidates(settings.candidates, len(train))  # type: ignore[arg-type]
    queries = batch_features(model, test_batch, settings.feature_fn, device)
    local = block_shard(len(train), train.batch_size, collectives.rank, collectives.world_size)

    def search() -> Neighbours:
        if settings.knn_backend == "torch":
            nearest = NearestNeighbours(queries, k)
            for indices, batch in train.batches_with_indices(local):
                nearest.update(batch_features(model, batch, settings.feature_fn, device), indices)
            return nearest.result()
        pairs = [(i, batch_features(model, b, settings.feature_fn, device).cpu())
                 for i, b in train.batches_with_indices(local)]
        if not pairs:
            return Neighbours(torch.empty(len(queries), 0, dtype=torch.long), torch.empty(len(queries), 0))
        keys, indices = torch.cat([f for _, f in pairs]), torch.cat([i for i, _ in pairs])
        found = knn_faiss(queries, keys, min(k, len(keys)))
        return Neighbours(indices[found.indices], found.distances)

    _, parts = gather_checked(collectives, search)
    return merge_neighbours(parts, k)


def score_candidates(
    problem: InfluenceProblem, train: IndexedData, s_vectors: torch.Tensor, candidates: Neighbours,
    settings: ExplainSettings, collectives: Collectives, on_chunk: Callable[[int], None] | None,
) -> tuple[TopInfluences, torch.Tensor]:
    """Scores of each point's own candidates ``[q, k]``: the union is sharded over ranks, scored once, merged."""
    collector = CandidateScoreCollector(candidates.indices, s_vectors.dtype)
    local = shard(collector.union(), collectives.rank, collectives.world_size)

    def score_shard() -> torch.Tensor:
        collect_candidate_scores(problem, train, s_vectors, collector, local, settings.scoring, settings.chunk_size,
                                 on_chunk)
        return collector.scores

    _, parts = gather_checked(collectives, score_shard)
    scores = CandidateScoreCollector.combine(parts)
    return top_influences_of(scores, candidates.indices, settings.top_k), scores


def merge_top_influences(tops: Sequence[TopInfluences], k: int) -> TopInfluences:
    """The top-k of disjoint shards from their own top-k lists: harmful among harmful, helpful among helpful.

    Merged separately, no example is listed twice: in a shard of fewer than 2k examples an example can be in
    both of that shard's lists.
    """
    harmful = top_influences_of(torch.cat([t.harmful_scores for t in tops], 1),
                                torch.cat([t.harmful_indices for t in tops], 1), k)
    helpful = top_influences_of(torch.cat([t.helpful_scores for t in tops], 1),
                                torch.cat([t.helpful_indices for t in tops], 1), k)
    return TopInfluences(harmful.harmful_indices, harmful.harmful_scores, helpful.helpful_indices, helpful.helpful_scores)


def _influencers(
    model: nn.Module, loss_fn: LossFn, train: IndexedData, indices: torch.Tensor, scores: torch.Tensor,
    device: torch.device, describe: Describe,
) -> tuple[Influencer, ...]:
    batch = prepare_batch(train.fetch(indices.tolist()), device)
    with torch.no_grad():
        losses = loss_fn(model, batch).detach().cpu()
    info = describe(model, batch)
    images = info.inputs is not None and looks_like_image(info.inputs[0])
    return tuple(
        Influencer(
            train_index=int(index),
            influence=float(score),
            label=_item(info.labels, row),
            prediction=_item(info.predictions, row),
            loss=float(losses[row]),
            input=info.inputs[row].detach().cpu() if images else None,
        )
        for row, (index, score) in enumerate(zip(indices.tolist(), scores.tolist()))
    )


def _item(values: Optional[torch.Tensor], row: int) -> Any:
    if values is None:
        return None
    value = values[row]
    return value.item() if value.numel() == 1 else value.tolist()


def explain(
    model: nn.Module,
    loss_fn: LossFn,
    train: IndexedData,
    val: IndexedData,
    config: SolverConfig,
    damping: float,
    settings: ExplainSettings,
    collectives: Collectives | None = None,
    describe: Describe = describe_batch,
    on_lissa_step: Callable[[], None] | None = None,
    on_scored: Callable[[int], None] | None = None,
) -> Explanation:
    """Explain the monitored validation points of ``model`` by the training examples of ``train``.

    Runs in analysis mode (eval, RNG restored). ``on_lissa_step``/``on_scored`` feed progress bars.
    """
    collectives = collectives or SingleProcess()
    problem = InfluenceProblem(model, loss_fn, train.loader(), damping, config)
    device = problem.device
    timings: dict[str, float] = {}
    with analysis_mode(model):
        start = time.perf_counter()
        _, losses, predictions = validation_losses(model, loss_fn, val, device, collectives)
        labels = describe(model, prepare_batch(val.fetch(range(len(val))), device)).labels if settings.misclassified_only else None
        chosen = select_points(settings, val, losses, predictions, None if labels is None else labels.cpu())
        if not chosen:
            raise ValueError("No validation point to explain: with `misclassified_only=True` the model made no error.")
        test_batch = prepare_batch(val.fetch(chosen), device)
        gradients = problem.gradients(test_batch)
        timings["select"] = time.perf_counter() - start

        candidates = None
        if settings.candidates is not None:
            start = time.perf_counter()
            candidates = find_candidates(model, test_batch, train, settings, collectives, device)
            timings["candidates"] = time.perf_counter() - start

        start = time.perf_counter()
        s_vectors, info = solve_s_test(problem, gradients, collectives, on_lissa_step)
        timings["s_test"] = time.perf_counter() - start

        start = time.perf_counter()
        full_indices = None
        if candidates is None:
            top, kept_scores, full_scores = score_training_set(problem, train, s_vectors, settings, collectives,
                                                               on_scored)
        else:  # only each point's own candidates are scored and reported: the others are absent, not zero
            top, kept_scores = score_candidates(problem, train, s_vectors, candidates, settings, collectives, on_scored)
            full_scores = kept_scores if settings.keep_full_scores else None
            full_indices = candidates.indices if settings.keep_full_scores else None
        timings["scoring"] = time.perf_counter() - start

        test_info = describe(model, test_batch)
        images = test_info.inputs is not None and looks_like_image(test_info.inputs[0])
        points = []
        for row, val_index in enumerate(chosen):
            harmful = _influencers(model, loss_fn, train, top.harmful_indices[row], top.harmful_scores[row], device, describe)
            helpful = _influencers(model, loss_fn, train, top.helpful_indices[row], top.helpful_scores[row], device, describe)
            points.append(
                ExplainedPoint(
                    val_index=int(val_index),
                    label=_item(test_info.labels, row),
                    prediction=_item(test_info.predictions, row),
                    loss=float(losses[val_index]),
                    harmful=harmful,
                    helpful=helpful,
                    scores=kept_scores[row] if kept_scores is not None else None,
                    input=test_info.inputs[row].detach().cpu() if images else None,
                )
            )
    summary = SolverSummary(
        solver=info.solver,
        damping=info.damping,
        converged=info.converged,
        seconds=info.seconds,
        scale=info.scale,
        settings={k: v for k, v in config.__dict__.items()},
        trace=info.trace,
    )
    return Explanation(tuple(points), summary, timings, len(train), full_scores, full_indices)
