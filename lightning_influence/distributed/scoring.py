"""Sharded scoring: each rank scores its shard of the training set, the top-k lists are merged.

Also the candidate (kNN) search over fixed blocks of the training set, and the scoring of each point's own
candidates. Every function is called on every rank with the same arguments and returns the same result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn

from lightning_influence.config import (
    PRESELECT_MIN_BATCHES,
    PRESELECT_PROBE_EXAMPLES,
    ExplainConfig,
    check_num_candidates,
)
from lightning_influence.core.candidates import (
    CandidateScoreCollector,
    Neighbours,
    PreselectionEstimate,
    collect_candidate_scores,
    merge_neighbours,
    select_candidates,
    time_preselection,
)
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import Scorer, StreamingTopK, merge_top_influences, top_influences_of
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.collectives import Collectives
from lightning_influence.distributed.sharding import block_shard, gather_checked, shard
from lightning_influence.results import ScoreShard, TopInfluences

#: Influence scores kept per monitored point for its histogram (a regular subsample beyond this).
MAX_HISTOGRAM_SCORES = 100_000


def score_training_set(
    problem: Scorer, train: IndexedData, s_vectors: torch.Tensor, settings: ExplainConfig,
    collectives: Collectives, on_chunk: Callable[[int], None] | None, indices: Sequence[int] | None = None,
) -> tuple[TopInfluences, torch.Tensor, Optional[ScoreShard]]:
    """Top-k over this rank's shard merged across ranks, a gathered histogram sample of the scores (every
    ``step``-th training index, in index order) and, if asked, this rank's full scores (not gathered).

    ``indices`` restricts scoring to those training indices (default: all).
    """
    local_indices = shard(range(len(train)) if indices is None else indices, collectives.rank, collectives.world_size)
    step = max(1, -(-len(train) // MAX_HISTOGRAM_SCORES))
    full: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score_shard() -> tuple[TopInfluences, torch.Tensor, torch.Tensor]:
        top = StreamingTopK(s_vectors.shape[0], settings.top_k)
        empty = (s_vectors.new_empty((s_vectors.shape[0], 0), device="cpu"), torch.empty(0, dtype=torch.long))
        sampled, full[:] = [empty], [empty]  # a shard may be empty
        for indices, batch in train.batches_with_indices(local_indices):
            position = 0
            for block in problem.scores(s_vectors, [batch], settings.scoring, settings.chunk_size):
                block_indices = indices[position : position + block.shape[1]]
                position += block.shape[1]
                top.update(block, block_indices)
                block = block.cpu()
                keep = block_indices % step == 0
                sampled.append((block[:, keep], block_indices[keep]))
                if settings.keep_full_scores:
                    full.append((block, block_indices))
                if on_chunk is not None:
                    on_chunk(block.shape[1])
        return top.result(), torch.cat([b for b, _ in sampled], 1), torch.cat([i for _, i in sampled])

    _, gathered = gather_checked(collectives, score_shard)
    sample = torch.cat([g[1] for g in gathered], dim=1)
    sample_indices = torch.cat([g[2] for g in gathered])
    sample = sample[:, sample_indices.argsort()]
    merged = merge_top_influences([g[0] for g in gathered], settings.top_k)
    local = None
    if settings.keep_full_scores:
        local = ScoreShard(torch.cat([i for _, i in full]), torch.cat([b for b, _ in full], 1),
                           collectives.rank, collectives.world_size)
    return merged, sample, local


def _width(settings: ExplainConfig, train: IndexedData) -> int:
    """``settings.num_candidates`` checked against the training set (the config checked the rest when built)."""
    k = check_num_candidates(settings.num_candidates, len(train))
    if k is None:  # a caller's bug, not the user's input: the callers branch on num_candidates first
        raise RuntimeError("The candidate search ran without `num_candidates`.")
    return k


def find_candidates(
    model: nn.Module, test_batch: Batch, train: IndexedData, settings: ExplainConfig, collectives: Collectives,
    device: torch.device, loss_fn: Optional[LossFn] = None,
) -> Neighbours:
    """Each test point's ``settings.num_candidates`` nearest training examples in feature space, the same on
    every rank and for every world size: :func:`~lightning_influence.core.candidates.select_candidates` on this
    rank's fixed blocks of the training set, then one merge. ``loss_fn`` is needed for
    ``feature_fn="last_layer_grad"`` only."""
    k = _width(settings, train)
    local = block_shard(len(train), train.batch_size, collectives.rank, collectives.world_size)
    _, parts = gather_checked(collectives, lambda: select_candidates(
        model, test_batch, train.batches_with_indices(local), k, settings.feature_fn, settings.knn_backend, device,
        loss_fn))
    return merge_neighbours(parts, k)


def estimate_preselection(
    problem: InfluenceProblem, test_batch: Batch, vectors: torch.Tensor, train: IndexedData, settings: ExplainConfig,
    collectives: Collectives, loss_fn: Optional[LossFn] = None,
) -> PreselectionEstimate:
    """Whether preselecting ``settings.num_candidates`` candidates per row of ``vectors [q, P]`` would save time:
    every rank times the same probe (the first training batch, at most ``PRESELECT_PROBE_EXAMPLES`` examples) and
    the times are averaged over ranks, so every rank gets the same estimate and takes the same decision. A
    training set of fewer than ``PRESELECT_MIN_BATCHES`` probe batches is not probed (full scoring)."""
    k = _width(settings, train)
    size = min(len(train), train.batch_size, PRESELECT_PROBE_EXAMPLES)
    if len(train) < PRESELECT_MIN_BATCHES * size:
        return PreselectionEstimate(len(train), k, vectors.shape[0], 0.0, 0.0, probed=False)
    probe = train.fetch(range(size))
    _, timings = gather_checked(collectives, lambda: time_preselection(
        problem, test_batch, probe, size, vectors, k, settings.feature_fn, settings.knn_backend, loss_fn,
        settings.scoring, settings.chunk_size))
    features, scoring, fixed = (sum(t[i] for t in timings) / len(timings) for i in range(3))
    return PreselectionEstimate(len(train), k, vectors.shape[0], features, scoring, fixed)


def choose_candidates(
    problem: InfluenceProblem, test_batch: Batch, vectors: torch.Tensor, train: IndexedData, settings: ExplainConfig,
    collectives: Collectives, loss_fn: Optional[LossFn] = None,
) -> tuple[Optional[Neighbours], Optional[str]]:
    """:func:`find_candidates`, or, with ``settings.preselect="auto"`` when :func:`estimate_preselection` says
    that scoring every training example is cheaper, ``(None, note)``: the caller scores everything (rank 0 warns
    with the note). ``vectors`` stand in for s_test in the timing (the test gradients: same shape)."""
    if settings.preselect == "auto":
        estimate = estimate_preselection(problem, test_batch, vectors, train, settings, collectives, loss_fn)
        if not estimate.pays:
            if collectives.rank == 0:
                warnings.warn(estimate.note(), UserWarning, stacklevel=3)
            return None, estimate.note()
    return find_candidates(problem.model, test_batch, train, settings, collectives, problem.device, loss_fn), None


def score_candidates(
    problem: Scorer, train: IndexedData, s_vectors: torch.Tensor, candidates: Neighbours,
    settings: ExplainConfig, collectives: Collectives, on_chunk: Callable[[int], None] | None,
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


def candidate_score_shard(scores: torch.Tensor, indices: torch.Tensor) -> ScoreShard:
    """The candidates' scores ``[q, k]`` (training indices ``indices [q, k]``) as one shard over their union,
    NaN where an example is not a candidate of that point (absent, not zero). Small: rank 0 writes it alone."""
    union = indices.unique()
    table = scores.new_full((scores.shape[0], len(union)), float("nan"))
    table.scatter_(1, torch.searchsorted(union, indices), scores)
    return ScoreShard(union, table, rank=0, world_size=1)
