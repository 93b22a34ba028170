"""Candidate preselection (FastIF, Guo et al. 2021): score each test point only against its k nearest
training examples in the model's feature space.

Data flow: model features of the training set and of the test points -> exact k nearest neighbours (torch,
chunked over the training set; or FAISS) -> per-test-point candidate indices ``[q, k]`` -> the union is scored
once, each test point keeps only the scores of its own candidates (:class:`CandidateScores`).

Two built-in feature choices, named by ``feature_fn``:

- ``"last_layer_grad"`` (the default with the torch backend): rank training examples by the magnitude of the
  inner product of last-layer loss gradients. For the last linear layer ``y = W a + b`` and output gradient
  ``g_i = dL_i/dy_i``, example i's gradient is ``g_i a_i^T`` (and ``g_i`` for the bias, i.e. ``a_i`` extended
  by a 1), and ``<g_q a_q^T, g_i a_i^T> = (g_q . g_i)(a_q . a_i)``: influence with an identity Hessian
  restricted to that layer, computed without materialising the ``out x in`` gradients. The most harmful
  (positive) and the most helpful (negative) influences are both large in magnitude, so candidates are the
  k largest ``|<G_q, G_i>|``. On digits this finds 76-89 % of full scoring's top-10 harmful and 92-95 % of
  the top-10 helpful with 10 % of the training set as candidates, against 35-54 % for activations
  (docs/fast-path.md, section 2).
- ``"activations"`` (the default with FAISS, which cannot index the factored product): Euclidean kNN on the
  input of the last ``nn.Linear`` leaf module that runs in the forward pass (captured by a forward hook),
  i.e. the representation the classifier head sees.

A callable ``feature_fn(model, batch) -> Tensor[B, D]`` gives Euclidean kNN on its features. Distances are
computed pair by pair (no ``||a||^2 + ||b||^2 - 2 a.b`` matmul trick; no matmul for the gradient products), so
a distance never depends on how the training set is chunked; ties are broken by the smaller training index.
Together with features computed in fixed batches this makes the candidate sets independent of chunking and
of the number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, cast

import torch
from torch import nn

from lightning_influence.config import ACTIVATIONS, KNN_BACKENDS, LAST_LAYER_GRAD
from lightning_influence.config import check_feature_choice as check_feature_fn
from lightning_influence.core.per_example.features import (
    FeatureFn,
    GradientFactors,
    batch_features,
    factored_similarity,
    last_linear_input,
)
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import Scorer
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.data import IndexedData


def resolve_feature_fn(feature_fn: FeatureFn | str | None, backend: str = "torch") -> FeatureFn | str:
    """The feature choice to use: ``None`` is ``"last_layer_grad"`` with the torch backend and
    ``"activations"`` with FAISS; ``"activations"`` is :func:`last_linear_input`."""
    check_feature_fn(feature_fn, backend)
    if feature_fn is None:
        return LAST_LAYER_GRAD if backend == "torch" else last_linear_input
    return last_linear_input if feature_fn == ACTIVATIONS else feature_fn


def check_knn_backend(backend: str) -> str:
    """``backend`` must be ``"torch"`` or ``"faiss"``, and FAISS must be importable when asked for."""
    if backend not in KNN_BACKENDS:
        raise ValueError(f"Expected `knn_backend` to be one of {KNN_BACKENDS}, but got {backend!r}.")
    if backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "knn_backend='faiss' needs the `faiss` package, which is not installed. Install it with"
                " `pip install faiss-cpu` (or faiss-gpu), or use knn_backend='torch' (exact, the default)."
            ) from err
    return backend


@dataclass(frozen=True)
class Neighbours:
    """The k nearest training examples of each query: ``indices`` and ``distances`` ``[q, k]``, nearest first.

    With gradient features the "distance" is ``-|<G_q, G_i>|`` (smaller = more influential under that proxy)."""

    indices: torch.Tensor
    distances: torch.Tensor


def merge_neighbours(parts: Sequence[Neighbours], k: int) -> Neighbours:
    """The k nearest among several disjoint candidate lists: by distance, ties by the smaller index."""
    indices = torch.cat([p.indices.cpu() for p in parts], dim=1)
    distances = torch.cat([p.distances.cpu().to(torch.float64) for p in parts], dim=1)
    by_index = indices.argsort(dim=1, stable=True)
    indices, distances = indices.gather(1, by_index), distances.gather(1, by_index)
    by_distance = distances.argsort(dim=1, stable=True)[:, :k]
    return Neighbours(indices.gather(1, by_distance), distances.gather(1, by_distance))


def _widths(features: torch.Tensor | GradientFactors) -> tuple[int, ...]:
    if isinstance(features, GradientFactors):
        return features.out_grads.shape[1], features.inputs.shape[1]
    return (features.shape[1],)


class NearestNeighbours:
    """Exact streaming kNN: feed training features block by block, O(q (k + block)) memory.

    Args:
        queries: ``[q, D]`` test-point features (Euclidean distance), or :class:`GradientFactors` (then the
            "distance" is ``-|<G_q, G_j>|``: the largest gradient inner products in magnitude come first).
        k: neighbours kept per query.
    """

    def __init__(self, queries: torch.Tensor | GradientFactors, k: int) -> None:
        self.queries = queries
        self.k = k
        self._best = Neighbours(torch.empty(queries.shape[0], 0, dtype=torch.long),
                                torch.empty(queries.shape[0], 0, dtype=torch.float64))

    def update(self, keys: torch.Tensor | GradientFactors, indices: torch.Tensor) -> None:
        """Add training features ``keys [b, D]`` with training indices ``indices [b]``."""
        if _widths(keys) != _widths(self.queries):
            raise ValueError(
                f"Expected training and test features of the same kind and width, but got {type(keys).__name__}"
                f" of width {keys.shape[1]} and {type(self.queries).__name__} of width {self.queries.shape[1]}."
            )
        if isinstance(self.queries, GradientFactors):
            distances = -factored_similarity(self.queries, keys).abs()  # type: ignore[arg-type]
        else:
            distances = torch.cdist(self.queries.double(), keys.to(self.queries.device).double(),  # type: ignore[union-attr]
                                    compute_mode="donot_use_mm_for_euclid_dist")
        block = Neighbours(indices.cpu().long().expand(distances.shape[0], -1), distances.cpu())
        self._best = merge_neighbours([self._best, block], self.k)

    def result(self) -> Neighbours:
        return self._best


def knn_torch(queries: torch.Tensor | GradientFactors, keys: torch.Tensor | GradientFactors, k: int,
              chunk_size: int = 4096) -> Neighbours:
    """Exact k nearest rows of ``keys [n, D]`` for every row of ``queries [q, D]``, ``chunk_size`` keys at a time."""
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive int, but got {chunk_size!r}.")
    search = NearestNeighbours(queries, k)
    for start in range(0, keys.shape[0], chunk_size):
        stop = min(start + chunk_size, keys.shape[0])
        block = (GradientFactors(keys.out_grads[start:stop], keys.inputs[start:stop])
                 if isinstance(keys, GradientFactors) else keys[start:stop])
        search.update(block, torch.arange(start, stop))
    return search.result()


def knn_faiss(queries: torch.Tensor, keys: torch.Tensor, k: int) -> Neighbours:
    """Exact k nearest neighbours with a FAISS flat L2 index (float32; distances returned as Euclidean)."""
    import faiss

    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.detach().cpu().float().contiguous().numpy())
    squared, found = index.search(queries.detach().cpu().float().contiguous().numpy(), k)
    return Neighbours(torch.from_numpy(found).long(), torch.from_numpy(squared).double().clamp_min(0).sqrt())


def knn(queries: torch.Tensor, keys: torch.Tensor, k: int, backend: str = "torch", chunk_size: int = 4096) -> Neighbours:
    """Exact k nearest neighbours by ``backend`` (``"torch"``: chunked ``cdist`` + top-k; ``"faiss"``)."""
    check_knn_backend(backend)
    if backend == "faiss":
        return knn_faiss(queries, keys, k)
    return knn_torch(queries, keys, k, chunk_size)


def select_candidates(
    model: nn.Module,
    test_batch: Batch,
    train_batches: Iterable[tuple[torch.Tensor, Batch]],
    k: int,
    feature_fn: FeatureFn | str | None = None,
    backend: str = "torch",
    device: Optional[torch.device] = None,
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
) -> Neighbours:
    """The k nearest training examples of every test point in feature space.

    Args:
        model: the model (in eval mode) the features come from.
        test_batch: the test points.
        train_batches: ``(training indices [b], batch)`` pairs; with the torch backend features are streamed,
            with FAISS they are collected first.
        k: candidates per test point.
        feature_fn: ``(model, batch) -> Tensor[B, D]`` (Euclidean kNN); ``"last_layer_grad"``: rank by
            ``|<G_test, G_i>|`` of last-layer loss gradients (needs ``loss_fn``); ``"activations"``:
            :func:`last_linear_input`. None: ``"last_layer_grad"`` (torch backend), ``"activations"`` (FAISS).
        backend: ``"torch"`` or ``"faiss"``.
        loss_fn: per-example losses ``(model, batch) -> [B]``, for ``feature_fn="last_layer_grad"``.
    """
    feature_fn = resolve_feature_fn(feature_fn, backend)
    check_knn_backend(backend)
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    queries = batch_features(model, test_batch, feature_fn, device, loss_fn)
    if backend == "torch":
        search = NearestNeighbours(queries, k)
        for indices, batch in train_batches:
            search.update(batch_features(model, batch, feature_fn, device, loss_fn), indices)
        return search.result()
    pairs = [(indices, cast(torch.Tensor, batch_features(model, batch, feature_fn, device)).cpu())
             for indices, batch in train_batches]  # FAISS: plain feature tensors (never gradient factors)
    query_features = cast(torch.Tensor, queries)
    if not pairs:  # e.g. a rank's empty shard
        return Neighbours(torch.empty(len(query_features), 0, dtype=torch.long), torch.empty(len(query_features), 0))
    keys = torch.cat([f for _, f in pairs])
    found = knn_faiss(query_features, keys, min(k, len(keys)))
    all_indices = torch.cat([i.long() for i, _ in pairs])
    return Neighbours(all_indices[found.indices], found.distances)


@dataclass(frozen=True)
class PreselectionEstimate:
    """Does candidate preselection save time? Per-example seconds measured on one probe batch of training examples.

    The candidate path computes features of all ``n_train`` examples (plus the kNN update, and the test points'
    features once: ``fixed_seconds``) and then scores the union of the ``q`` candidate sets of ``k``; full scoring
    scores all ``n_train``. The union is estimated as that of ``q`` independent random k-subsets,
    ``n (1 - (1 - k/n)^q)``: an over-estimate for gradient candidates, whose sets overlap more (docs/fast-path.md),
    so the estimate errs towards full scoring. Preselection pays when ``candidate_seconds < full_seconds``, i.e.
    (without the fixed part) when ``feature_seconds / scoring_seconds < (1 - k/n)^q``. ``probed=False``: the
    training set is too small to be worth a probe (a few batches); full scoring is chosen without one.
    """

    n_train: int
    k: int
    q: int
    feature_seconds: float
    scoring_seconds: float
    fixed_seconds: float = 0.0
    probed: bool = True

    @property
    def expected_union(self) -> float:
        return self.n_train * (1.0 - (1.0 - self.k / self.n_train) ** self.q)

    @property
    def candidate_seconds(self) -> float:
        return self.fixed_seconds + self.n_train * self.feature_seconds + self.expected_union * self.scoring_seconds

    @property
    def full_seconds(self) -> float:
        return self.n_train * self.scoring_seconds

    @property
    def pays(self) -> bool:
        return self.probed and self.candidate_seconds < self.full_seconds

    def note(self) -> str:
        """One line on why every training example was scored instead."""
        if not self.probed:
            why = (f"the training set ({self.n_train} examples) is only a few batches, where finding candidates costs"
                   " about as much as scoring everything")
        else:
            why = (f"estimated {self.candidate_seconds:.3g} s for the features of {self.n_train} examples and scoring"
                   f" about {self.expected_union:.0f} candidates, against {self.full_seconds:.3g} s for scoring all")
        return (f"num_candidates={self.k}: candidate preselection would not save time here ({why}), so every training"
                " example was scored (exact top lists). Pass preselect='always' to preselect anyway.")


def time_preselection(
    problem: InfluenceProblem,
    test_batch: Batch,
    probe: Batch,
    probe_size: int,
    vectors: torch.Tensor,
    k: int,
    feature_fn: FeatureFn | str | None = None,
    backend: str = "torch",
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
    method: str = "auto",
    chunk_size: int = 256,
) -> tuple[float, float, float]:
    """Seconds per example of the candidate features of ``probe`` (``probe_size`` training examples; with the
    torch kNN update) and of scoring it against ``vectors [q, P]`` (their values do not matter: the test gradients
    do), and the seconds of the test points' features. One run each (wall clock); the results are discarded."""
    feature_fn = resolve_feature_fn(feature_fn, backend)
    model, device = problem.model, problem.device
    start = time.perf_counter()
    queries = batch_features(model, test_batch, feature_fn, device, loss_fn)
    fixed = time.perf_counter() - start
    start = time.perf_counter()
    keys = batch_features(model, probe, feature_fn, device, loss_fn)
    if backend == "torch":
        NearestNeighbours(queries, k).update(keys, torch.arange(probe_size))
    features = time.perf_counter() - start
    start = time.perf_counter()
    for _ in problem.scores(vectors, [probe], method, chunk_size):
        pass
    return features / probe_size, (time.perf_counter() - start) / probe_size, fixed


@dataclass(frozen=True)
class CandidateScores:
    """Influence on each test point of its own candidates only (an indexed, sparse result).

    ``indices [q, k]``: training indices of each test point's candidates (nearest first); ``scores [q, k]``
    their influence ``I(z, z_test)`` (positive = harmful). Non-candidates have no score at all.
    """

    indices: torch.Tensor
    scores: torch.Tensor

    def dense(self, n_train: int) -> torch.Tensor:
        """``[q, n_train]`` with NaN for every training example that was not a candidate of that test point."""
        out = torch.full((self.scores.shape[0], n_train), float("nan"), dtype=self.scores.dtype)
        return out.scatter_(1, self.indices, self.scores)


class CandidateScoreCollector:
    """Fills ``[q, k]`` candidate scores from ``[q, b]`` blocks scored over the union of all candidates.

    Blocks may arrive in any order and cover any part of the union (e.g. one process's shard); entries never
    fed stay NaN, so partial collectors from disjoint shards combine with :meth:`combine`.
    """

    def __init__(self, candidate_indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        self.indices = candidate_indices.cpu().long()
        q, k = self.indices.shape
        flat = self.indices.flatten()
        order = flat.argsort(stable=True)
        self._sorted_train = flat[order]
        self._rows = torch.arange(q).repeat_interleave(k)[order]
        self._slots = torch.arange(k).repeat(q)[order]
        self.scores = torch.full((q, k), float("nan"), dtype=dtype)

    def union(self) -> list[int]:
        """Every training index that is a candidate of at least one test point, ascending."""
        return torch.unique(self.indices).tolist()

    def update(self, block: torch.Tensor, block_indices: torch.Tensor) -> None:
        """Keep, for each test point, the scores in ``block [q, b]`` of its own candidates among ``block_indices``."""
        block = block.detach().cpu()
        block_indices = block_indices.cpu().long()
        order = block_indices.argsort()
        sorted_block = block_indices[order]
        if len(sorted_block) == 0:
            return
        position = torch.searchsorted(sorted_block, self._sorted_train).clamp_max(len(sorted_block) - 1)
        hit = sorted_block[position] == self._sorted_train
        columns = order[position[hit]]
        self.scores[self._rows[hit], self._slots[hit]] = block[self._rows[hit], columns].to(self.scores.dtype)

    def result(self) -> CandidateScores:
        return CandidateScores(self.indices, self.scores)

    @staticmethod
    def combine(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Merge ``[q, k]`` partial score tables from disjoint shards (each entry filled by exactly one)."""
        out = parts[0].clone()
        for part in parts[1:]:
            filled = ~torch.isnan(part)
            out[filled] = part[filled]
        return out


def collect_candidate_scores(
    problem: Scorer,
    data: IndexedData,
    s_vectors: torch.Tensor,
    collector: CandidateScoreCollector,
    indices: Sequence[int],
    method: str = "auto",
    chunk_size: int = 256,
    on_chunk: Optional[Callable[[int], None]] = None,
) -> None:
    """Score the training examples ``indices`` of ``data`` against ``s_vectors`` into ``collector``."""
    for batch_indices, batch in data.batches_with_indices(indices):
        position = 0
        for block in problem.scores(s_vectors, [batch], method, chunk_size):
            collector.update(block, batch_indices[position : position + block.shape[1]])
            position += block.shape[1]
            if on_chunk is not None:
                on_chunk(block.shape[1])
