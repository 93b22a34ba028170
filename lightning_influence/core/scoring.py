"""Scoring training examples against s_test vectors: ``I(z_i, z_test) = -s_test . grad L(z_i)``.

Two ways, equal to float tolerance:

* ``jvp``: forward-mode ``jvp`` of the per-example loss vector along each s_test (vmapped over the k
  tangents) yields ``[grad L(z_i) . s]_i`` for a whole chunk in about one forward pass per vector, without
  per-example gradients in memory. Peak extra memory: about k times the chunk's activations.
* ``per_example_grad``: ``vmap(grad)`` per-example gradients ``G [chunk, P]`` then ``-S G^T``. Peak extra
  memory: ``chunk x P`` floats, kept under :data:`PER_EXAMPLE_BUDGET` by shrinking the chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.func import jvp, vmap

from lightning_influence.core.batching import Batch, batch_size_of, prepare_batch, slice_batch
from lightning_influence.core.config import SCORING_METHODS
from lightning_influence.core.losses import FunctionalLoss
from lightning_influence.core.params import Params, num_parameters, unflatten

#: Most floats held at once by the per-example-gradient path (chunk x P): 2^26 floats = 256 MiB in float32.
PER_EXAMPLE_BUDGET = 2**26
#: ``auto`` uses per-example gradients for models up to this many parameters, jvp above.
AUTO_PER_EXAMPLE_MAX_PARAMS = 100_000


def resolve_method(method: str, num_params: int) -> str:
    if method not in SCORING_METHODS:
        raise ValueError(f"Expected `scoring` to be one of {SCORING_METHODS}, but got {method!r}.")
    if method != "auto":
        return method
    return "per_example_grad" if num_params <= AUTO_PER_EXAMPLE_MAX_PARAMS else "jvp"


def score_chunk(loss: FunctionalLoss, params: Params, batch: Batch, s_vectors: torch.Tensor, method: str) -> torch.Tensor:
    """``[k, B]`` influence of every example of ``batch`` on each of the k test points."""
    if method == "per_example_grad":
        return -(s_vectors @ loss.per_example_grads(params, batch).T)

    def directional(tangent: Params) -> torch.Tensor:
        return jvp(lambda p: loss(p, batch), (params,), (tangent,))[1]

    return -vmap(directional)(unflatten(s_vectors, params))


def iter_scores(
    loss: FunctionalLoss,
    params: Params,
    batches: Iterable[Batch],
    s_vectors: torch.Tensor,
    method: str = "auto",
    chunk_size: int = 256,
) -> Iterator[torch.Tensor]:
    """Yield ``[k, b]`` score blocks for consecutive examples of ``batches``, in order, chunk by chunk."""
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive int, but got {chunk_size!r}.")
    size = num_parameters(params)
    method = resolve_method(method, size)
    if method == "per_example_grad":
        chunk_size = max(1, min(chunk_size, PER_EXAMPLE_BUDGET // size))
    device = s_vectors.device
    for batch in batches:
        batch = prepare_batch(batch, device)
        total = batch_size_of(batch)
        for start in range(0, total, chunk_size):
            chunk = batch if total <= chunk_size else slice_batch(batch, start, start + chunk_size)
            yield score_chunk(loss, params, chunk, s_vectors, method).detach()


@dataclass(frozen=True)
class TopInfluences:
    """Top-m harmful (largest positive) and helpful (most negative) training examples per test point.

    Rows are test points; ``*_indices`` hold training indices, ``*_scores`` their influence, sorted from
    the strongest. Fewer than m columns when the training set is smaller.
    """

    harmful_indices: torch.Tensor
    harmful_scores: torch.Tensor
    helpful_indices: torch.Tensor
    helpful_scores: torch.Tensor


class StreamingTopK:
    """Keeps the top-m harmful and helpful training examples while scores stream in: O(k m) memory."""

    def __init__(self, num_points: int, m: int) -> None:
        if m < 1:
            raise ValueError(f"Expected `top_k` to be a positive int, but got {m!r}.")
        self.m = m
        self._scores = torch.empty(num_points, 0)
        self._indices = torch.empty(num_points, 0, dtype=torch.long)

    def update(self, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Add a ``[k, b]`` block of scores for training examples ``indices [b]``."""
        scores = torch.cat([self._scores, scores.detach().cpu().to(self._scores.dtype)], dim=1)
        indices = torch.cat([self._indices, indices.cpu().long().expand(scores.shape[0], -1)], dim=1)
        self._scores, self._indices = scores, indices
        if scores.shape[1] > 4 * self.m:
            self._compact()

    def _compact(self) -> None:
        width = min(self.m, self._scores.shape[1])
        high = self._scores.topk(width, dim=1)
        low = (-self._scores).topk(width, dim=1)
        keep = torch.cat([high.indices, low.indices], dim=1)
        self._scores = self._scores.gather(1, keep)
        self._indices = self._indices.gather(1, keep)

    def result(self) -> TopInfluences:
        return top_influences_of(self._scores, self._indices, self.m)


def top_influences_of(scores: torch.Tensor, indices: torch.Tensor, m: int) -> TopInfluences:
    """Top-m harmful/helpful from a ``[k, n]`` score block with distinct training ``indices`` (``[n]`` or ``[k, n]``)."""
    if indices.dim() == 1:
        indices = indices.expand(scores.shape[0], -1)
    width = min(m, scores.shape[1])
    high = scores.topk(width, dim=1)
    low = scores.topk(width, dim=1, largest=False)
    return TopInfluences(indices.gather(1, high.indices), high.values, indices.gather(1, low.indices), low.values)

