"""Gauss-Newton products from a stored output Jacobian, for training sets and models small enough to keep it.

With M outputs per example, the Gauss-Newton product of a minibatch b is
``G_b V = (1/|b|) sum_{i in b} J_i^T H_i J_i V``, with ``J_i [M, P]`` the Jacobian of example i's outputs in the
parameters and ``H_i [M, M]`` the Hessian of its loss in those outputs. Writing ``H_i = R_i R_i^T`` (its
eigendecomposition, ``R_i = Q_i sqrt(w_i)``, keeping the r columns whose eigenvalue is not zero for every
example: r = M - 1 for cross-entropy), ``G_b = (1/|b|) sum F_i^T F_i`` with ``F_i = R_i^T J_i [r, P]``. When the
N examples' ``F_i`` fit in :func:`jacobian_budget` numbers (a share of the device's free memory) they are
computed once per analysis, reading the data once (the ``H_i`` by one batched double backward per batch, then
per batch one forward pass of the per-example hook engine and the r gradients of ``column_c(R_i) . f_i`` by
batched backward passes), and every later product is two matrix products over stored rows instead of a forward
and ``1 + 2k`` backward passes: the same matrix, so the same answers. Minibatches are then given by
training-set indices (:class:`RowBatch`), drawn exactly as
:func:`~lightning_influence.core.solvers.neumann.minibatch_stream` draws its batches. The store is checked against
the autograd product once; a model it does not fit, or one it disagrees with, keeps the autograd products. So does
one whose autograd product is already the faster (timed on the first batch's rows before the rest is stored): a
stored product costs about ``2 r P`` per example and vector, an autograd one a forward and backward pass, so the
store wins on convolutions and long sequences (many operations per parameter) and loses on small dense models
(measured in ``benchmarks/scale.py``: an MLP's LiSSA took nine times longer with its 3.6 GB store than without).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sized
from typing import Any, NamedTuple, cast

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler

from lightning_influence.core.curvature.products import (
    PRODUCT_PROBE_EXAMPLES,
    BatchProduct,
    SplitLoss,
    map_floating,
    split_forward,
    split_module,
)
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
#: The store's build keeps the training batches it read for the output Hessians, to compute the factors from them
#: without reading the data again, while they take at most this share of the store's own size.
KEEP_BATCHES_FRACTION = 0.25
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

    Batches come as ``(batch, weights [B, M])`` so that slicing a batch slices its weights too; with ``weights``
    None it returns the outputs ``f [B, M]`` themselves (for :meth:`PerExampleEngine.output_grads`)."""

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
        flat = flat_outputs(outputs, batch_size_of(batch))
        return flat if weights is None else (flat * weights).sum(dim=1)


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
    m = flat.shape[1]
    if not flat.requires_grad:  # losses linear in the outputs
        return flat.new_zeros(size, m, m)
    try:  # the M rows by one batched double backward
        picks = torch.eye(m, dtype=flat.dtype, device=flat.device)[:, None, :].expand(m, size, m)
        batched = torch.autograd.grad(flat, split.leaves, grad_outputs=picks, is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
        return torch.cat([(r if r is not None else torch.zeros(m, *x.shape, dtype=x.dtype, device=x.device)
                           ).reshape(m, size, -1) for r, x in zip(batched, split.leaves)], dim=2).transpose(0, 1).detach()
    except (RuntimeError, NotImplementedError) as err:  # no batching rule for some operation of the loss
        if "out of memory" in str(err).lower():
            raise
    rows = []
    for row_index in range(m):
        row = torch.autograd.grad(flat[:, row_index].sum(), split.leaves, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(r if r is not None else torch.zeros_like(x)).reshape(size, -1)
                               for r, x in zip(row, split.leaves)], dim=1))
    return torch.stack(rows, dim=1).detach()


def build_output_jacobian(loss: FunctionalLoss, params: Params, loader: Any, device: torch.device,
                          reference: BatchProduct, budget: int | None = None) -> OutputJacobian | None:
    """The stored Jacobian of ``loader``'s whole map-style dataset (in index order), or None when it would not fit
    ``budget`` numbers (default: :func:`jacobian_budget`), the data is not map-style, its product is not the faster
    (:func:`_store_is_faster`, timed on the first batch's rows) or it disagrees with ``reference`` (the autograd one).

    The data is read once: the output Hessians of every batch first (the roots' columns are chosen over the whole
    set), then each batch's ``r`` rows of factors from one forward pass and batched backward passes
    (:meth:`PerExampleEngine.output_grads`), from the batches kept in memory while they take at most
    :data:`KEEP_BATCHES_FRACTION` of the store's size (else read a second time). The timed comparison reuses the
    first batch's rows."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    n = len(loader.dataset)  # type: ignore[arg-type]
    p = sum(t.numel() for t in params.values())
    size = max(loader.batch_size or 1, 64)
    ordered = iter(DataLoader(loader.dataset, batch_size=size, collate_fn=loader.collate_fn))
    first = prepare_batch(next(ordered), device)
    hessians = [_hessians(loss, params, first)]  # [B, M, M]: M, the outputs per example, before the budget check
    m = hessians[0].shape[1]
    if budget is None:
        budget = jacobian_budget(device, loss.dtype)
    if m == 0 or n * m * p > budget:
        return None
    key = (tuple((name, tuple(t.shape)) for name, t in params.items()), _shapes(first), m, loss.dtype, str(device))
    if TIMED and SPEED_VERDICTS.get(key) is False:
        return None
    target = None if isinstance(loss.loss_fn, SplitLoss) else split_module(loss, params, first)
    engine = PerExampleEngine(FunctionalLoss(loss.model, _Outputs(loss, target), loss.dtype), params)
    batches: list[Batch] | None = [first]
    kept, limit = _batch_bytes(first), KEEP_BATCHES_FRACTION * n * m * p * torch.empty(0, dtype=loss.dtype).element_size()
    for raw in ordered:
        batch = prepare_batch(raw, device)
        hessians.append(_hessians(loss, params, batch))
        if batches is not None:
            kept += _batch_bytes(batch)
            batches = batches + [batch] if kept <= limit else None
    roots = _hessian_roots(torch.cat(hessians))
    factors = torch.empty(n, roots.shape[2], p, dtype=loss.dtype, device=device)
    source = iter(batches) if batches is not None else (prepare_batch(raw, device) for raw in DataLoader(
        loader.dataset, batch_size=size, collate_fn=loader.collate_fn))  # too large to keep: read again
    start = 0
    for batch in source:
        rows = batch_size_of(batch)
        _factor_rows(engine, batch, roots[start : start + rows], factors[start : start + rows])
        if start == 0 and TIMED:
            if key not in SPEED_VERDICTS:
                SPEED_VERDICTS[key] = _store_is_faster(factors[:rows], batch, reference, p, loss.dtype, device)
            if not SPEED_VERDICTS[key]:
                return None
        start += rows
    store = OutputJacobian(factors)
    return store if _agrees(store, reference, first, n, p, loss.dtype, device) else None


def _factor_rows(engine: PerExampleEngine, batch: Batch, roots: torch.Tensor, out: torch.Tensor) -> None:
    """``out [B, r, P]``: the factors ``F_i = R_i^T J_i`` of ``batch``, from one forward pass where every parameter
    takes the engine's hooks, else one per-example gradient pass per column ``c`` (the gradient of
    ``column_c(R_i) . f_i``)."""
    if not engine.checked:
        engine.check((batch, roots[:, :, 0]))
    if engine.output_grads((batch, None), roots, out):
        return
    for c in range(roots.shape[2]):
        out[:, c] = engine.grads((batch, roots[:, :, c]))


def _batch_bytes(batch: Any) -> int:
    """Bytes of the tensors in a batch (nested tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(_batch_bytes(value) for value in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(_batch_bytes(value) for value in batch)
    return 0


def _shapes(batch: Any) -> tuple[Any, ...]:
    """The shapes of the tensors in a batch (nested tuples, lists and dicts), as a hashable key."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape)
    if isinstance(batch, dict):
        return tuple((key, _shapes(value)) for key, value in sorted(batch.items(), key=lambda item: str(item[0])))
    if isinstance(batch, (tuple, list)):
        return tuple(_shapes(value) for value in batch)
    return ()


def _store_is_faster(factors: torch.Tensor, batch: Batch, reference: BatchProduct, p: int, dtype: torch.dtype,
                     device: torch.device) -> bool:
    """Whether the stored product over the rows ``factors`` of ``batch``'s first :data:`PROBE_EXAMPLES` examples
    (gathered in another order, as LiSSA's shuffled minibatches are) takes less time than the autograd product of
    those examples, for :data:`PROBE_VECTORS` vectors."""
    size = min(batch_size_of(batch), PROBE_EXAMPLES)
    batch = slice_batch(batch, 0, size)
    store = OutputJacobian(factors[:size])
    vectors = torch.randn(PROBE_VECTORS, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vectors = vectors.to(dtype).to(device)
    order = torch.arange(size - 1, -1, -1)
    stored = _best_seconds(lambda: store.product(RowBatch(order), vectors), device)  # a new RowBatch: re-gathered
    # the autograd product first on as few examples as its own first call times its batched and looped forms on
    # (PRODUCT_PROBE_EXAMPLES): a product on fewer examples takes no longer, so a stored product faster than that
    # one is the faster, without the autograd product over the whole probe (the common case, e.g. convolutions)
    few = slice_batch(batch, 0, min(size, PRODUCT_PROBE_EXAMPLES))
    if stored < _best_seconds(lambda: reference(few, vectors), device):
        return True
    return stored < _best_seconds(lambda: reference(batch, vectors), device, warm_up=lambda: None)


def _best_seconds(call: Callable[[], Any], device: torch.device, repeats: int = 1,
                  warm_up: Callable[[], Any] | None = None) -> float:
    """The least wall time of ``repeats`` calls of ``call`` after one untimed call of ``warm_up`` (default:
    ``call``)."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    (warm_up or call)()
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
