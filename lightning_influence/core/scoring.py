"""Scoring training examples against s_test vectors: ``I(z_i, z_test) = -s_test . grad L(z_i)``.

Four ways, equal to float tolerance:

* ``hooks`` (:mod:`~lightning_influence.core.per_example.engine`, the ``auto`` choice): module hooks record each
  supported layer's inputs and output gradients in one forward/backward of the chunk and score per layer in
  factored form (Linear with any leading dims, Conv1d/2d, Embedding, norm affines, Hugging Face Conv1D); every
  other parameter takes a generic per-example autograd path. No ``vmap``: works for models it cannot trace.
* ``factored`` (:mod:`~lightning_influence.core.per_example.factored`): when every trainable parameter belongs to an
  ``nn.Linear`` / ``nn.Conv2d``, per-example gradients factor as ``g_i a_i^T``: one forward pass, one backward
  pass for the layer output gradients, then one layer-sized matmul per test vector. Peak extra memory: the
  chunk's activations and output gradients plus ``chunk x k x min(in, out)`` per linear layer.
* ``jvp``: forward-mode ``jvp`` of the per-example loss vector along each s_test (vmapped over the k
  tangents) yields ``[grad L(z_i) . s]_i`` for a whole chunk in about one forward pass per vector, without
  per-example gradients in memory. Peak extra memory: about k times the chunk's activations.
* ``per_example_grad``: ``vmap(grad)`` per-example gradients ``G [chunk, P]`` then ``-S G^T``, parameter by
  parameter. Peak extra memory: ``chunk x P`` floats, kept under :data:`PER_EXAMPLE_BUDGET` by shrinking the
  chunk.

``auto`` picks ``hooks`` (measured at least as fast as the former choice, ``factored``, on the digits CNN and MLP:
docs/per-example.md). ``jvp`` and ``per_example_grad`` fall back to loops without ``vmap`` when ``vmap`` cannot trace
the model. A chunk that runs out of memory is retried
in halves before the error is raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Protocol, cast

import torch
from torch.func import jvp, vmap

from lightning_influence.config import SCORING_METHODS
from lightning_influence.core.per_example.engine import PerExampleEngine
from lightning_influence.core.per_example.factored import FactoredLayer, factored_dot, factored_layers
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch, batch_size_of, prepare_batch, slice_batch
from lightning_influence.core.tensors.params import Params, num_parameters, unflatten
from lightning_influence.results import TopInfluences

#: Most floats held at once by the per-example-gradient path (chunk x P): 2^26 floats = 256 MiB in float32.
PER_EXAMPLE_BUDGET = 2**26
#: ``auto`` uses per-example gradients for models up to this many parameters, jvp above.
AUTO_PER_EXAMPLE_MAX_PARAMS = 100_000
#: Relative disagreement between ``factored`` and ``jvp`` on the first examples that makes ``auto`` fall back.
FACTORED_CHECK_TOLERANCE = 1e-3


class Scorer(Protocol):
    """What scores training examples (an :class:`~lightning_influence.core.InfluenceProblem`, or influence averaged
    over weight snapshots): ``[k, b]`` blocks of ``-s . grad L(z)`` over ``batches``, in order."""

    def scores(self, s_vectors: torch.Tensor, batches: Iterable[Batch] | None = None, method: str = "auto",
               chunk_size: int = 256) -> Iterator[torch.Tensor]: ...


def resolve_method(method: str, num_params: int, factorable: bool = False) -> str:
    if method not in SCORING_METHODS:
        raise ValueError(f"Expected `scoring` to be one of {SCORING_METHODS}, but got {method!r}.")
    if method != "auto":
        return method
    return "hooks"


def score_chunk(
    loss: FunctionalLoss,
    params: Params,
    batch: Batch,
    s_vectors: torch.Tensor,
    method: str,
    layers: Optional[list[FactoredLayer]] = None,
    check: bool = True,
    engine: Optional[PerExampleEngine] = None,
) -> torch.Tensor:
    """``[k, B]`` influence of every example of ``batch`` on each of the k test points."""
    if method == "hooks":
        return -(engine or PerExampleEngine(loss, params)).dot(batch, s_vectors)
    if method == "factored":
        layers = layers if layers is not None else factored_layers(loss.model, params)
        if layers is None:
            raise ValueError(
                "`scoring='factored'` needs every trainable parameter to be the weight or bias of an nn.Linear or"
                " nn.Conv2d (groups=1); use scoring='auto', 'jvp' or 'per_example_grad' for this model."
            )
        return -factored_dot(loss, params, layers, batch, s_vectors)
    if method == "per_example_grad":
        grads = loss.per_example_grad_dict(params, batch, check=check)
        tangents = unflatten(s_vectors, params)
        k = s_vectors.shape[0]
        total = sum(tangents[name].reshape(k, -1) @ g.reshape(g.shape[0], -1).T for name, g in grads.items())
        return -cast(torch.Tensor, total)

    def directional(tangent: Params) -> torch.Tensor:
        return jvp(lambda p: loss(p, batch), (params,), (tangent,))[1]

    tangents = unflatten(s_vectors, params)
    try:
        return -vmap(directional)(tangents)
    except (RuntimeError, NotImplementedError) as err:  # vmap cannot trace the model (.item(), data-dependent code)
        if _is_out_of_memory(err):
            raise
        return -torch.stack([directional({n: t[j] for n, t in tangents.items()}) for j in range(s_vectors.shape[0])])


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _factored_agrees(loss: FunctionalLoss, params: Params, batch: Batch, s_vectors: torch.Tensor,
                     layers: list[FactoredLayer]) -> bool:
    """Spot-check ``factored`` against plain autograd on the first example (catches models it cannot see into,
    e.g. a layer's weight also used outside its forward)."""
    example = slice_batch(batch, 0, 1)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    grads = torch.autograd.grad(loss(leaves, example).sum(), list(leaves.values()), allow_unused=True)
    tangents = unflatten(s_vectors, params)
    k = s_vectors.shape[0]
    reference = -cast(torch.Tensor, sum(tangents[name].reshape(k, -1) @ g.reshape(-1)
                                        for name, g in zip(leaves, grads) if g is not None))
    fast = score_chunk(loss, params, example, s_vectors, "factored", layers)[:, 0]
    return bool((fast - reference).norm() <= FACTORED_CHECK_TOLERANCE * reference.norm().clamp_min(1e-12))


def iter_scores(  # long: method choice, spot check, out-of-memory halving share one loop
    loss: FunctionalLoss,
    params: Params,
    batches: Iterable[Batch],
    s_vectors: torch.Tensor,
    method: str = "auto",
    chunk_size: int = 256,
    engine: Optional[PerExampleEngine] = None,
) -> Iterator[torch.Tensor]:
    """Yield ``[k, b]`` score blocks for consecutive examples of ``batches``, in order, chunk by chunk.

    A chunk that runs out of memory is split in halves (down to single examples) and the smaller size is
    kept for the rest of the pass.
    """
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive int, but got {chunk_size!r}.")
    size = num_parameters(params)
    layers = factored_layers(loss.model, params) if method == "factored" else None
    requested, method = method, resolve_method(method, size, factorable=layers is not None)
    if method == "hooks" and engine is None:
        engine = PerExampleEngine(loss, params)
    if method == "per_example_grad":
        chunk_size = max(1, min(chunk_size, PER_EXAMPLE_BUDGET // size))
    device = s_vectors.device
    first = True
    for batch in batches:
        batch = prepare_batch(batch, device)
        total = batch_size_of(batch)
        if first:
            first = False
            if method == "per_example_grad":  # vmap over single examples would hide a wrong loss shape
                with torch.no_grad():
                    loss(params, slice_batch(batch, 0, min(total, 2)))
            if (method == "factored" and requested == "auto" and layers is not None
                    and not _factored_agrees(loss, params, batch, s_vectors, layers)):
                warnings.warn(
                    "Factored scoring disagreed with autograd on a spot check (the loss may use a layer's parameters"
                    " outside its forward, or couple examples); scoring with jvp/per-example gradients instead.",
                    stacklevel=2,
                )
                method = resolve_method("auto", size, factorable=False)
                if method == "per_example_grad":
                    chunk_size = max(1, min(chunk_size, PER_EXAMPLE_BUDGET // size))
        start = 0
        while start < total:
            stop = min(start + chunk_size, total)
            chunk = batch if (start, stop) == (0, total) else slice_batch(batch, start, stop)
            try:
                block = score_chunk(loss, params, chunk, s_vectors, method, layers, check=False, engine=engine).detach()
            except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not _is_out_of_memory(err) or stop - start == 1:
                    raise
                chunk_size = max(1, (stop - start) // 2)
                warnings.warn(f"Scoring ran out of memory; retrying with chunk_size={chunk_size}.", stacklevel=2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if not bool(torch.isfinite(block).all()):
                bad = (~torch.isfinite(block)).any(dim=0).nonzero().flatten()[:10]
                raise ValueError(
                    f"Expected finite influence scores, but training examples at positions {(bad + start).tolist()}"
                    " of this batch have non-finite gradients (NaN/inf loss or weights). Influence needs finite"
                    " losses and gradients: check those examples (NaN inputs, labels out of range) and the model."
                )
            yield block
            start = stop


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
        device = scores.device  # kept on the scores' device (no transfer per block); result() returns CPU tensors
        scores = torch.cat([self._scores.to(device), scores.detach().to(self._scores.dtype)], dim=1)
        indices = torch.cat([self._indices.to(device), indices.to(device).long().expand(scores.shape[0], -1)], dim=1)
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
        return top_influences_of(self._scores.cpu(), self._indices.cpu(), self.m)


def top_influences_of(scores: torch.Tensor, indices: torch.Tensor, m: int) -> TopInfluences:
    """Top-m harmful/helpful from a ``[k, n]`` score block with distinct training ``indices`` (``[n]`` or ``[k, n]``)."""
    if indices.dim() == 1:
        indices = indices.expand(scores.shape[0], -1)
    width = min(m, scores.shape[1])
    high = scores.topk(width, dim=1)
    low = scores.topk(width, dim=1, largest=False)
    return TopInfluences(indices.gather(1, high.indices), high.values, indices.gather(1, low.indices), low.values)


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
