"""Candidate preselection (FastIF, Guo et al. 2021): score each test point only against its k nearest
training examples in the model's feature space.

Data flow: model features of the training set and of the test points -> exact k nearest neighbours (torch,
chunked over the training set; or FAISS) -> per-test-point candidate indices ``[q, k]`` -> the union is scored
once, each test point keeps only the scores of its own candidates (:class:`CandidateScores`).

Features default to the input of the last ``nn.Linear`` leaf module that runs in the forward pass (captured by
a forward hook), i.e. the representation the classifier head sees. Distances are Euclidean, computed pair by
pair (no ``||a||^2 + ||b||^2 - 2 a.b`` matmul trick), so a distance never depends on how the training set is
chunked; ties are broken by the smaller training index. Together with features computed in fixed batches this
makes the candidate sets independent of chunking and of the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lightning_influence.core.batching import Batch, prepare_batch
from lightning_influence.core.data import IndexedData
from lightning_influence.core.problem import InfluenceProblem

FeatureFn = Callable[[nn.Module, Batch], torch.Tensor]
KNN_BACKENDS = ("torch", "faiss")


def check_candidates(candidates: int, n_train: int) -> int:
    """``candidates`` must be an int in ``[1, n_train]``."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= n_train:
        raise ValueError(
            f"Expected `candidates` to be an int between 1 and the training-set size {n_train}, but got"
            f" {candidates!r}. Pass the number of nearest training examples to score per test point, or"
            " candidates=None to score every training example."
        )
    return candidates


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


def last_linear_input(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``[B, D]``: the input of the last ``nn.Linear`` leaf module called in ``model``'s forward pass.

    ``batch`` is a batch as ``loss_fn`` sees it; ``model`` is called on its first tensor (``batch[0]`` of a
    tuple/list, ``batch["input"]``-style keys of a dict, or the tensor itself). For other layouts pass a
    ``feature_fn``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and not list(m.children())]
    if not linears:
        raise ValueError(
            f"Expected `model` ({type(model).__name__}) to contain an nn.Linear layer whose input serves as the"
            " features for candidate preselection, but it has none. Pass `feature_fn=lambda model, batch: ...`"
            " returning a Tensor[B, D] of features."
        )
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, args, _out: captured.append(args[0])) for m in linears]
    try:
        model(_model_input(batch))
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError(
            "No nn.Linear layer of `model` ran in its forward pass, so there are no features for candidate"
            " preselection. Pass `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
        )
    return captured[-1]


def _model_input(batch: Batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "image", "images", "features"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise ValueError(
        f"Cannot tell the model input in a batch of type {type(batch).__name__} for candidate features. Pass"
        " `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
    )


def batch_features(model: nn.Module, batch: Batch, feature_fn: Optional[FeatureFn], device: torch.device) -> torch.Tensor:
    """``[B, D]`` float features of ``batch`` (no gradients), from ``feature_fn`` or :func:`last_linear_input`."""
    batch = prepare_batch(batch, device)
    with torch.no_grad():
        features = (feature_fn or last_linear_input)(model, batch)
    if not isinstance(features, torch.Tensor) or features.dim() < 1:
        raise ValueError(f"Expected features to be a Tensor[B, D], but got {type(features).__name__}.")
    features = features.detach().reshape(features.shape[0], -1)
    return features if features.is_floating_point() else features.float()


@dataclass(frozen=True)
class Neighbours:
    """The k nearest training examples of each query: ``indices`` and ``distances`` ``[q, k]``, nearest first."""

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


class NearestNeighbours:
    """Exact streaming kNN: feed training features block by block, O(q (k + block)) memory.

    Args:
        queries: ``[q, D]`` test-point features.
        k: neighbours kept per query.
    """

    def __init__(self, queries: torch.Tensor, k: int) -> None:
        self.queries = queries
        self.k = k
        empty = queries.new_empty((queries.shape[0], 0))
        self._best = Neighbours(torch.empty(queries.shape[0], 0, dtype=torch.long), empty.cpu().double())

    def update(self, keys: torch.Tensor, indices: torch.Tensor) -> None:
        """Add training features ``keys [b, D]`` with training indices ``indices [b]``."""
        if keys.shape[1] != self.queries.shape[1]:
            raise ValueError(
                f"Expected training and test features of the same width, but got {keys.shape[1]} and"
                f" {self.queries.shape[1]}."
            )
        distances = torch.cdist(self.queries.double(), keys.to(self.queries.device).double(),
                                compute_mode="donot_use_mm_for_euclid_dist")
        block = Neighbours(indices.cpu().long().expand(distances.shape[0], -1), distances.cpu())
        self._best = merge_neighbours([self._best, block], self.k)

    def result(self) -> Neighbours:
        return self._best


def knn_torch(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 4096) -> Neighbours:
    """Exact k nearest rows of ``keys [n, D]`` for every row of ``queries [q, D]``, ``chunk_size`` keys at a time."""
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive int, but got {chunk_size!r}.")
    search = NearestNeighbours(queries, k)
    for start in range(0, keys.shape[0], chunk_size):
        search.update(keys[start : start + chunk_size], torch.arange(start, min(start + chunk_size, keys.shape[0])))
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
    feature_fn: Optional[FeatureFn] = None,
    backend: str = "torch",
    device: Optional[torch.device] = None,
) -> Neighbours:
    """The k nearest training examples of every test point in feature space.

    Args:
        model: the model (in eval mode) the features come from.
        test_batch: the test points.
        train_batches: ``(training indices [b], batch)`` pairs; with the torch backend features are streamed,
            with FAISS they are collected first.
        k: candidates per test point.
        feature_fn: ``(model, batch) -> Tensor[B, D]``; default :func:`last_linear_input`.
        backend: ``"torch"`` or ``"faiss"``.
    """
    check_knn_backend(backend)
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    queries = batch_features(model, test_batch, feature_fn, device)
    if backend == "torch":
        search = NearestNeighbours(queries, k)
        for indices, batch in train_batches:
            search.update(batch_features(model, batch, feature_fn, device), indices)
        return search.result()
    pairs = [(indices, batch_features(model, batch, feature_fn, device).cpu()) for indices, batch in train_batches]
    found = knn_faiss(queries, torch.cat([f for _, f in pairs]), k)
    all_indices = torch.cat([i.long() for i, _ in pairs])
    return Neighbours(all_indices[found.indices], found.distances)


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
    problem: InfluenceProblem,
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
