"""Gauss-Newton products from a stored output Jacobian, for training sets and models small enough to keep it.

With M outputs per example, the Gauss-Newton product of a minibatch b is
``G_b V = (1/|b|) sum_{i in b} J_i^T H_i J_i V``, with ``J_i [M, P]`` the Jacobian of example i's outputs in the
parameters and ``H_i [M, M]`` the Hessian of its loss in those outputs. When the N examples' Jacobians fit in
:data:`JACOBIAN_BUDGET` numbers they are computed once per analysis (M passes of the per-example hook engine
over the training set, and M double-backward passes for the ``H_i``), and every later product is three tensor
contractions over stored rows instead of a forward and ``1 + 2k`` backward passes: the same matrix, so the
same answers. Minibatches are then given by training-set indices (:class:`RowBatch`), drawn exactly as
:func:`~lightning_influence.core.lissa.minibatch_stream` draws its batches. The store is checked against the
autograd product once; a model it does not fit, or one it disagrees with, keeps the autograd products.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, NamedTuple, cast

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler

from lightning_influence.core.batching import Batch, batch_size_of, prepare_batch
from lightning_influence.core.curvature import BatchProduct, SplitLoss, map_floating, split_forward, split_module
from lightning_influence.core.losses import FunctionalLoss
from lightning_influence.core.params import Params
from lightning_influence.core.per_example import PerExampleEngine

#: Most numbers (N examples x M outputs x P parameters) the stored Jacobian may hold: 512 MiB in float32.
JACOBIAN_BUDGET = 2**27
#: Training examples per index chunk of a product over a subset (bounds the gathered rows' memory).
ROW_CHUNK = 1024
#: Largest relative difference from the autograd product (one minibatch, random vectors) for the store to be used.
AGREEMENT_TOLERANCE = 1e-3


class RowBatch(NamedTuple):
    """A minibatch named by training-set indices, for products from a stored Jacobian."""

    indices: torch.Tensor


def row_stream(n: int, batch_size: int, seed: int) -> Iterator[RowBatch]:
    """The index minibatches :func:`~lightning_influence.core.lissa.minibatch_stream` draws for ``seed``: the
    same seeded shuffles, epoch after epoch, so both streams visit the same examples in the same groups."""
    generator = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(cast(Sized, range(n)), generator=generator), batch_size,
                           drop_last=n >= batch_size)
    while True:
        for indices in sampler:
            yield RowBatch(torch.as_tensor(indices, dtype=torch.long))


class OutputJacobian:
    """The stored ``J [N, M, P]`` and ``H [N, M, M]`` of the training set; :meth:`product` is ``G_b V``."""

    def __init__(self, jacobian: torch.Tensor, hessian: torch.Tensor) -> None:
        self.jacobian, self.hessian = jacobian, hessian
        self._last: tuple[RowBatch, torch.Tensor, torch.Tensor] | None = None

    def rows(self, rows: RowBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``J`` and ``H`` of ``rows``: views for a range; else gathered, and kept while the same batch is asked
        again (a Lanczos run on one minibatch, the scale probe)."""
        index = rows.indices
        first = int(index[0])
        if bool((index == torch.arange(first, first + len(index))).all()):
            return self.jacobian[first : first + len(index)], self.hessian[first : first + len(index)]
        if self._last is None or self._last[0] is not rows:
            index = index.to(self.jacobian.device)
            self._last = (rows, self.jacobian[index], self.hessian[index])
        return self._last[1], self._last[2]

    def product(self, rows: RowBatch, vectors: torch.Tensor) -> torch.Tensor:
        _, m, p = self.jacobian.shape
        jacobian, hessian = self.rows(rows)
        b = jacobian.shape[0]
        flat = jacobian.reshape(b * m, p)
        jv = (vectors @ flat.T).reshape(-1, b, m)  # [k, b, M]
        hjv = torch.einsum("bmn,kbn->kbm", hessian, jv)
        return (hjv.reshape(-1, b * m) @ flat).div_(b)


class _Outputs:
    """A per-example "loss" that is output coordinate ``m`` of the model, for the hook engine's gradients."""

    def __init__(self, loss: FunctionalLoss, target: torch.nn.Module | None) -> None:
        self.loss, self.target, self.m = loss, target, 0

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
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
        return flat_outputs(outputs, batch_size_of(batch))[:, self.m]


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
                          reference: BatchProduct, budget: int = JACOBIAN_BUDGET) -> OutputJacobian | None:
    """The stored Jacobian of ``loader``'s whole map-style dataset (in index order), or None when it would not fit
    ``budget``, the data is not map-style, or its product disagrees with ``reference`` (the autograd one)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    n = len(loader.dataset)  # type: ignore[arg-type]
    p = sum(t.numel() for t in params.values())
    ordered = DataLoader(loader.dataset, batch_size=max(loader.batch_size or 1, 64), collate_fn=loader.collate_fn)
    first = prepare_batch(next(iter(ordered)), device)
    m = flat_outputs(_output_probe(loss, params, first), batch_size_of(first)).shape[1]
    if m == 0 or n * m * p > budget:
        return None
    target = None if isinstance(loss.loss_fn, SplitLoss) else split_module(loss, params, first)
    coordinate = _Outputs(loss, target)
    engine = PerExampleEngine(FunctionalLoss(loss.model, coordinate, loss.dtype), params)
    jacobian = torch.empty(n, m, p, dtype=loss.dtype, device=device)
    hessian = torch.empty(n, m, m, dtype=loss.dtype, device=device)
    start = 0
    for raw in ordered:
        batch = prepare_batch(raw, device)
        size = batch_size_of(batch)
        for coordinate.m in range(m):
            jacobian[start : start + size, coordinate.m] = engine.grads(batch)
        hessian[start : start + size] = _hessians(loss, params, batch)
        start += size
    store = OutputJacobian(jacobian, hessian)
    return store if _agrees(store, reference, first, n, p, loss.dtype, device) else None


def _output_probe(loss: FunctionalLoss, params: Params, batch: Batch) -> Any:
    """The model's outputs on ``batch`` (requiring grad through the parameters), as the Gauss-Newton split sees them."""
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        return split_forward(loss, leaves, batch).outputs


def _agrees(store: OutputJacobian, reference: BatchProduct, batch: Batch, n: int, p: int, dtype: torch.dtype,
            device: torch.device) -> bool:
    size = batch_size_of(batch)
    vectors = torch.randn(2, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype).to(device)
    expected = reference(batch, vectors)
    got = store.product(RowBatch(torch.arange(min(size, n))), vectors)
    return float((got - expected).norm() / expected.norm().clamp_min(torch.finfo(dtype).tiny)) <= AGREEMENT_TOLERANCE
