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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lightning_influence.core.batching import Batch, prepare_batch
from lightning_influence.core.data import IndexedData
from lightning_influence.core.problem import InfluenceProblem

FeatureFn = Callable[[nn.Module, Batch], torch.Tensor]
#: Named built-in feature choices (pass as ``feature_fn``), see the module doc.
LAST_LAYER_GRAD = "last_layer_grad"
ACTIVATIONS = "activations"
FEATURE_NAMES = (LAST_LAYER_GRAD, ACTIVATIONS)
KNN_BACKENDS = ("torch", "faiss")
#: Entries of the ``[q, b, D]`` products formed at once by :func:`factored_similarity`.
_SIMILARITY_BLOCK = 1 << 22


def check_candidates(candidates: int, n_train: int) -> int:
    """``candidates`` must be an int in ``[1, n_train]``."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= n_train:
        raise ValueError(
            f"Expected `candidates` to be an int between 1 and the training-set size {n_train}, but got"
            f" {candidates!r}. Pass the number of nearest training examples to score per test point, or"
            " candidates=None to score every training example."
        )
    return candidates


def check_feature_fn(feature_fn: object, backend: str = "torch") -> None:
    """``feature_fn`` must be None, a callable, or one of :data:`FEATURE_NAMES` (``"last_layer_grad"``: torch
    backend only)."""
    if feature_fn is None or callable(feature_fn):
        return
    if feature_fn not in FEATURE_NAMES:
        raise ValueError(
            f"Expected `feature_fn` to be None (the default), {LAST_LAYER_GRAD!r} (last-layer loss gradients),"
            f" {ACTIVATIONS!r} (input of the last nn.Linear) or a callable (model, batch) -> Tensor[B, D], but got"
            f" {feature_fn!r}."
        )
    if feature_fn == LAST_LAYER_GRAD and backend != "torch":
        raise ValueError(
            f"feature_fn={LAST_LAYER_GRAD!r} ranks by a factored gradient inner product that FAISS cannot index;"
            " use knn_backend='torch' (exact) with it, or the default activation features with FAISS."
        )


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


@dataclass(frozen=True)
class GradientFactors:
    """Per-example last-layer loss gradients in factored form: example i's gradient is ``out_grads[i] inputs[i]^T``.

    ``out_grads [B, O]`` = ``dL_i/dy_i`` at the last ``nn.Linear``; ``inputs [B, I]`` its input (with a trailing
    1 when the layer has a bias, which adds the bias gradient ``g_i`` to the inner product).
    """

    out_grads: torch.Tensor
    inputs: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, O * I)``: the batch size and the width of the flattened gradients."""
        return self.out_grads.shape[0], self.out_grads.shape[1] * self.inputs.shape[1]

    def to(self, device: torch.device | str) -> GradientFactors:
        return GradientFactors(self.out_grads.to(device), self.inputs.to(device))

    def cpu(self) -> GradientFactors:
        return self.to("cpu")

    def flat(self) -> torch.Tensor:
        """``[B, O * I]`` the explicit gradients (for checks; the search never forms them)."""
        return (self.out_grads[:, :, None] * self.inputs[:, None, :]).reshape(self.out_grads.shape[0], -1)


def last_layer_gradients(model: nn.Module, batch: Batch, loss_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> GradientFactors:
    """Per-example gradients of ``loss_fn``'s losses w.r.t. the last ``nn.Linear`` leaf that runs, factored.

    The layer's output is made a leaf of the graph (its value is unchanged), so ``dL_i/dy_i`` is one backward
    pass of ``sum_i L_i`` whether or not the parameters require gradients. Needs per-example losses ``[B]``
    where ``L_i`` depends on row i only (eval mode) and a 2-D layer output ``[B, O]``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and not list(m.children())]
    if not linears:
        raise ValueError(
            f"feature_fn={LAST_LAYER_GRAD!r} needs an nn.Linear layer in `model` ({type(model).__name__}), but it"
            " has none. Pass `feature_fn=lambda model, batch: ...` returning a Tensor[B, D] of features."
        )
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        calls.append((module, args[0].detach(), leaf))
        return leaf

    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with torch.enable_grad():
            losses = loss_fn(model, batch)
            if not calls:
                raise ValueError(
                    f"No nn.Linear layer of `model` ran in `loss_fn`, so feature_fn={LAST_LAYER_GRAD!r} has no"
                    " gradients to use. Pass `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
                )
            module, inputs, output = calls[-1]
            if output.dim() != 2 or losses.dim() != 1 or losses.shape[0] != output.shape[0]:
                raise ValueError(
                    f"feature_fn={LAST_LAYER_GRAD!r} needs per-example losses [B] and a last nn.Linear output [B, O],"
                    f" but got losses of shape {tuple(losses.shape)} and output {tuple(output.shape)}. Pass"
                    " feature_fn='activations' or `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
                )
            (out_grads,) = torch.autograd.grad(losses.sum(), output, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if out_grads is None:
        out_grads = torch.zeros_like(output)
    if module.bias is not None:  # type: ignore[union-attr]
        inputs = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)
    return GradientFactors(out_grads.detach(), inputs)


def factored_similarity(queries: GradientFactors, keys: GradientFactors) -> torch.Tensor:
    """``[q, b]`` inner products ``<g_q a_q^T, g_j a_j^T> = (g_q . g_j)(a_q . a_j)`` in float64.

    Each entry is an elementwise product summed over its own row (no matmul), so it does not depend on how the
    keys are blocked: candidate sets stay the same for any chunking and number of processes.
    """
    return _pairwise_dot(queries.out_grads, keys.out_grads) * _pairwise_dot(queries.inputs, keys.inputs)


def _pairwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.to(a.device).double()
    step = max(1, _SIMILARITY_BLOCK // max(1, a.shape[0] * a.shape[1]))
    return torch.cat([(a[:, None, :] * b[None, start : start + step, :]).sum(-1) for start in range(0, b.shape[0], step)]
                     or [a.new_empty(a.shape[0], 0)], dim=1)


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


def batch_features(
    model: nn.Module, batch: Batch, feature_fn: FeatureFn | str | None, device: torch.device,
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
) -> torch.Tensor | GradientFactors:
    """``[B, D]`` float features of ``batch`` (no gradients), from ``feature_fn`` or (None, ``"activations"``)
    :func:`last_linear_input`; with ``feature_fn="last_layer_grad"`` the :class:`GradientFactors` of
    ``loss_fn``'s per-example losses. (Callers resolve the default first: :func:`resolve_feature_fn`.)"""
    batch = prepare_batch(batch, device)
    if feature_fn == ACTIVATIONS:
        feature_fn = last_linear_input
    if isinstance(feature_fn, str):
        check_feature_fn(feature_fn)
        if loss_fn is None:
            raise ValueError(f"feature_fn={LAST_LAYER_GRAD!r} needs the loss function, but none was given.")
        return last_layer_gradients(model, batch, loss_fn)
    with torch.no_grad():
        features = (feature_fn or last_linear_input)(model, batch)
    if not isinstance(features, torch.Tensor) or features.dim() < 1:
        raise ValueError(f"Expected features to be a Tensor[B, D], but got {type(features).__name__}.")
    features = features.detach().reshape(features.shape[0], -1)
    return features if features.is_floating_point() else features.float()


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
