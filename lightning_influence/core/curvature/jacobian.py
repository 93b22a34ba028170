"""Gauss-Newton products from a stored output Jacobian, for training sets and models small enough to keep it.

With M outputs per example, the Gauss-Newton product of a minibatch b is
``G_b V = (1/|b|) sum_{i in b} J_i^T H_i J_i V``, with ``J_i [M, P]`` the Jacobian of example i's outputs in the
parameters and ``H_i [M, M]`` the Hessian of its loss in those outputs. Writing ``H_i = R_i R_i^T`` (its
eigendecomposition, ``R_i = Q_i sqrt(w_i)``, keeping the r columns whose eigenvalue is not zero for every
example: r = M - 1 for cross-entropy), ``G_b = (1/|b|) sum F_i^T F_i`` with ``F_i = R_i^T J_i [r, P]``. When the
N examples' ``F_i`` fit in :func:`jacobian_budget` numbers (a share of the device's free memory) they are
computed once per analysis (the ``H_i`` by M double-backward passes, then r passes of the per-example hook
engine over the training set, each the gradient of ``column_c(R_i) . f_i``), and every later product is two
matrix products over stored rows instead of a forward and ``1 + 2k`` backward passes: the same matrix, so the
same answers. Minibatches are then given by training-set indices (:class:`RowBatch`), drawn exactly as
:func:`~lightning_influence.core.solvers.neumann.minibatch_stream`
draws its batches. The store is checked against the autograd product once; a model it does not fit, or one it
disagrees with, keeps the autograd products. So does one whose autograd product is already the faster (timed on
the first minibatch before anything is stored): a stored product costs about ``2 r P`` per example and vector, an
autograd one a forward and backward pass, so the store wins on convolutions and long sequences (many operations
per parameter) and loses on small dense models (measured in ``benchmarks/scale.py``: an MLP's LiSSA took nine
times longer with its 3.6 GB store than without).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sized
from itertools import islice
from typing import Any, NamedTuple, cast

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler

from lightning_influence.core.curvature.products import BatchProduct, SplitLoss, map_floating, split_forward, split_module
from lightning_influence.core.per_example.engine import PerExampleEngine
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch, batch_size_of, prepare_batch, slice_batch
from lightning_influence.core.tensors.memory import memory_budget
from lightning_influence.core.tensors.params import Params

#: Share of the device's free memory (when the analysis starts) that the stored Jacobian may take.
JACOBIAN_MEMORY_FRACTION = 0.25
#: Training examples per index chunk of a product over a subset (bounds the gathered rows' memory).
ROW_CHUNK = 1024
#: Examples of the one product compared with autograd before the store is used.
AGREEMENT_EXAMPLES = 32
#: Vectors in the timed comparison of a stored and an autograd product (the callback solves eight points at once).
PROBE_VECTORS = 8
#: Examples of that comparison: a minibatch of LiSSA's order of size, since the autograd product's per-call
#: overhead dominates a smaller one (on a 9k-parameter MLP the stored product was 1.8 times faster than autograd's
#: on 16 examples and 2.6 times slower on 64). One timed call of each after a warm-up: on a BERT with 128-token
#: sequences best-of-three products on 64 examples took 36 s, longer than its whole LiSSA run with the store.
PROBE_EXAMPLES = 64
#: Whether the store must also be faster than the autograd product on the first minibatch (tests that exercise
#: the store itself turn this off).
TIMED = True
#: The timing's verdict per parameter shapes, input shapes, outputs, dtype and device, kept for the process: every
#: analysis of the same model takes the same product path (and the probe runs once), whatever the machine's load.
SPEED_VERDICTS: dict[tuple[Any, ...], bool] = {}
#: Largest relative difference from the autograd product (one minibatch, random vectors) for the store to be used.
AGREEMENT_TOLERANCE = 1e-3


class RowBatch(NamedTuple):
    """A minibatch named by training-set indices, for products from a stored Jacobian."""

    indices: torch.Tensor


def row_stream(n: int, batch_size: int, seed: int) -> Iterator[RowBatch]:
    """The index minibatches :func:`~lightning_influence.core.solvers.neumann.minibatch_stream` draws for ``seed``: the
    same seeded shuffles, epoch after epoch, so both streams visit the same examples in the same groups."""
    generator = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(cast(Sized, range(n)), generator=generator), batch_size,
                           drop_last=n >= batch_size)
    while True:
        for indices in sampler:
            yield RowBatch(torch.as_tensor(indices, dtype=torch.long))


class OutputJacobian:
    """The stored factors ``F [N, r, P]`` of the training set (``G_i = F_i^T F_i``); :meth:`product` is ``G_b V``."""

    def __init__(self, factors: torch.Tensor) -> None:
        self.factors = factors
        self._last: tuple[RowBatch, torch.Tensor] | None = None
        self._buffer: torch.Tensor | None = None

    def rows(self, rows: RowBatch) -> torch.Tensor:
        """``F`` of ``rows``: a view for a range; else gathered, and kept while the same batch is asked again (a
        Lanczos run on one minibatch, the scale probe). The gather reuses one buffer per batch size (a fresh tensor
        each LiSSA step cost as much as the product itself on CPU), so the rows are valid until the next gather."""
        index = rows.indices
        first = int(index[0])
        if bool((index == torch.arange(first, first + len(index))).all()):
            return self.factors[first : first + len(index)]
        if self._last is None or self._last[0] is not rows:
            buffer = self._buffer
            if buffer is None or len(buffer) != len(index):
                buffer = self._buffer = self.factors.new_empty((len(index), *self.factors.shape[1:]))
            torch.index_select(self.factors, 0, index.to(self.factors.device), out=buffer)
            self._last = (rows, buffer)
        return self._last[1]

    def product(self, rows: RowBatch, vectors: torch.Tensor) -> torch.Tensor:
        factors = self.rows(rows)
        b, r, p = factors.shape
        flat = factors.reshape(b * r, p)
        return ((vectors @ flat.T) @ flat).div_(b)


class _Outputs:
    """A per-example "loss" ``weights_i . f_i`` (the model's flat outputs), for the hook engine's gradients.

    Batches come as ``(batch, weights [B, M])`` so that slicing a batch slices its weights too."""

    def __init__(self, loss: FunctionalLoss, target: torch.nn.Module | None) -> None:
        self.loss, self.target = loss, target

    def __call__(self, model: torch.nn.Module, weighted: Batch) -> torch.Tensor:
        batch, weights = weighted
        loss_fn = self.loss.loss_fn
        if isinstance(loss_fn, SplitLoss):
            outputs = loss_fn.outputs_fn(model, batch)
        else:
            captured: list[Any] = []
            assert self.target is not None
            handle = self.target.register_forward_hook(lambda mod, args, out: captured.append(out))
            try:
                loss_fn(model, batch)
            finally:
                handle.remove()
            outputs = captured[0]
        return (flat_outputs(outputs, batch_size_of(batch)) * weights).sum(dim=1)


def flat_outputs(outputs: Any, size: int) -> torch.Tensor:
    """``[B, M]``: the floating tensors of ``outputs`` that depend on the parameters, flattened per example (all of
    them where nothing requires grad: the hook engine's finiteness check runs without autograd)."""
    found: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    map_floating(outputs, keep)
    chosen = [t for t in found if t.requires_grad] or found
    return torch.cat([t.reshape(size, -1) for t in chosen], dim=1)


def _hessians(loss: FunctionalLoss, params: Params, batch: Batch) -> torch.Tensor:
    """``[B, M, M]``: each example's loss Hessian in its outputs (M double-backward passes; losses are per example,
    so the gradient of ``sum_i dl_i/df_i[m]`` in ``f_j`` is row m of ``H_j``)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    split = split_forward(loss, leaves, batch)
    size = batch_size_of(batch)
    grads = torch.autograd.grad(split.losses.sum(), split.leaves, create_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(size, -1)
                      for g, x in zip(grads, split.leaves)], dim=1)
    rows = []
    for m in range(flat.shape[1]):
        row = torch.autograd.grad(flat[:, m].sum(), split.leaves, retain_graph=True, allow_unused=True) \
            if flat.requires_grad else [None] * len(split.leaves)
        rows.append(torch.cat([(r if r is not None else torch.zeros_like(x)).reshape(size, -1)
                               for r, x in zip(row, split.leaves)], dim=1))
    return torch.stack(rows, dim=1).detach()


def build_output_jacobian(loss: FunctionalLoss, params: Params, loader: Any, device: torch.device,
                          reference: BatchProduct, budget: int | None = None) -> OutputJacobian | None:
    """The stored Jacobian of ``loader``'s whole map-style dataset (in index order), or None when it would not fit
    ``budget`` numbers (default: :func:`jacobian_budget`), the data is not map-style, or its product disagrees with
    ``reference`` (the autograd one)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    n = len(loader.dataset)  # type: ignore[arg-type]
    p = sum(t.numel() for t in params.values())
    ordered = DataLoader(loader.dataset, batch_size=max(loader.batch_size or 1, 64), collate_fn=loader.collate_fn)
    first = prepare_batch(next(iter(ordered)), device)
    hessians = [_hessians(loss, params, first)]  # [B, M, M]: M, the outputs per example, before the budget check
    m = hessians[0].shape[1]
    if budget is None:
        budget = jacobian_budget(device, loss.dtype)
    if m == 0 or n * m * p > budget:
        return None
    target = None if isinstance(loss.loss_fn, SplitLoss) else split_module(loss, params, first)
    engine = PerExampleEngine(FunctionalLoss(loss.model, _Outputs(loss, target), loss.dtype), params)
    if TIMED:
        key = (tuple((name, tuple(t.shape)) for name, t in params.items()), _shapes(first), m, loss.dtype, str(device))
        if key not in SPEED_VERDICTS:
            SPEED_VERDICTS[key] = _store_is_faster(engine, _hessian_roots(hessians[0]), first, reference, p,
                                                   loss.dtype, device)
        if not SPEED_VERDICTS[key]:
            return None
    # two passes over the data (it is not kept: N is bounded by the budget, the size of an example is not)
    hessians += [_hessians(loss, params, prepare_batch(raw, device)) for raw in islice(ordered, 1, None)]
    roots = _hessian_roots(torch.cat(hessians))
    factors = torch.empty(n, roots.shape[2], p, dtype=loss.dtype, device=device)
    start = 0
    for raw in ordered:
        batch = prepare_batch(raw, device)
        size = batch_size_of(batch)
        for c in range(roots.shape[2]):
            factors[start : start + size, c] = engine.grads((batch, roots[start : start + size, :, c]))
        start += size
    store = OutputJacobian(factors)
    return store if _agrees(store, reference, first, n, p, loss.dtype, device) else None


def _shapes(batch: Any) -> tuple[Any, ...]:
    """The shapes of the tensors in a batch (nested tuples, lists and dicts), as a hashable key."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape)
    if isinstance(batch, dict):
        return tuple((key, _shapes(value)) for key, value in sorted(batch.items(), key=lambda item: str(item[0])))
    if isinstance(batch, (tuple, list)):
        return tuple(_shapes(value) for value in batch)
    return ()


def _store_is_faster(engine: PerExampleEngine, roots: torch.Tensor, batch: Batch, reference: BatchProduct, p: int,
                     dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the stored product over the rows of ``batch``'s first :data:`PROBE_EXAMPLES` examples (gathered in
    another order, as LiSSA's shuffled minibatches are) takes less time than the autograd product of those examples,
    for :data:`PROBE_VECTORS` vectors."""
    size = min(batch_size_of(batch), PROBE_EXAMPLES)
    batch, roots = slice_batch(batch, 0, size), roots[:size]
    factors = torch.empty(size, roots.shape[2], p, dtype=dtype, device=device)
    for c in range(roots.shape[2]):
        factors[:, c] = engine.grads((batch, roots[:, :, c]))
    store = OutputJacobian(factors)
    vectors = torch.randn(PROBE_VECTORS, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vectors = vectors.to(dtype).to(device)
    order = torch.arange(size - 1, -1, -1)
    stored = _best_seconds(lambda: store.product(RowBatch(order), vectors), device)  # a new RowBatch: re-gathered
    return stored < _best_seconds(lambda: reference(batch, vectors), device)


def _best_seconds(call: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """The least wall time of ``repeats`` calls of ``call`` after one untimed call (the autograd product's own
    first call times its batched and looped forms)."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def jacobian_budget(device: torch.device, dtype: torch.dtype) -> int:
    """Most numbers (N examples x M outputs x P parameters) the stored Jacobian may hold on ``device``: a
    :data:`JACOBIAN_MEMORY_FRACTION` share of its free memory (CUDA: ``mem_get_info``; CPU: available memory),
    in elements of ``dtype``. The rows gathered for a minibatch come on top (at most ``ROW_CHUNK`` rows)."""
    return memory_budget(device, JACOBIAN_MEMORY_FRACTION, torch.empty(0, dtype=dtype).element_size())


def _hessian_roots(hessians: torch.Tensor) -> torch.Tensor:
    """``R [N, M, r]`` with ``R_i R_i^T = H_i``: eigenvectors times the root of their (clamped) eigenvalues, keeping
    the columns whose eigenvalue is above ``1e-6`` of the largest for some example."""
    values, vectors = torch.linalg.eigh(0.5 * (hessians + hessians.transpose(1, 2)))
    values = values.clamp_min(0.0)
    keep = (values > 1e-6 * values.max().clamp_min(torch.finfo(values.dtype).tiny)).any(dim=0)
    return (vectors * values.sqrt()[:, None, :])[:, :, keep]


def _agrees(store: OutputJacobian, reference: BatchProduct, batch: Batch, n: int, p: int, dtype: torch.dtype,
            device: torch.device) -> bool:
    """One product on the first ``AGREEMENT_EXAMPLES`` examples and a random vector, stored against autograd (one
    vector: the autograd product's batched-or-looped timing is left to real use)."""
    size = min(batch_size_of(batch), n, AGREEMENT_EXAMPLES)
    vectors = torch.randn(1, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype).to(device)
    expected = reference(slice_batch(batch, 0, size), vectors)
    got = store.product(RowBatch(torch.arange(size)), vectors)
    return float((got - expected).norm() / expected.norm().clamp_min(torch.finfo(dtype).tiny)) <= AGREEMENT_TOLERANCE
