"""Where an analysis's curvature products come from: autograd through the model, or the stored output Jacobian.

:class:`TrainingCurvature` is ``(batch, V) -> C_b V`` for the training data of one analysis. Batches are data
batches (autograd) or :class:`~lightning_influence.core.curvature.jacobian.RowBatch` index batches (stored Jacobian). It
decides once, on first use, whether the Jacobian is stored (Gauss-Newton, LiSSA or CG, map-style data, within
the budget, agreeing with autograd), and hands out the training subsets and LiSSA minibatches in the form its
products take.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_influence.core.curvature.base import Curvature
from lightning_influence.core.curvature.jacobian import ROW_CHUNK, OutputJacobian, RowBatch, build_output_jacobian, row_stream
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.data import subset_indices
from lightning_influence.core.tensors.params import Params


class TrainingCurvature:
    """``C_b V`` over minibatches of ``train_loader``'s data (see the module docstring).

    Args:
        loss, params: the analysis's loss and parameters.
        curvature: the curvature object (its ``storable`` decides whether the Jacobian may be stored).
        hvp_method: the Hessian product's method.
        train_loader: the training data.
        device: where the products run.
        store: allow the stored Jacobian (only for Gauss-Newton).
    """

    def __init__(self, loss: FunctionalLoss, params: Params, curvature: Curvature, hvp_method: str,
                 train_loader: Iterable[Batch], device: torch.device, store: bool) -> None:
        self.autograd = curvature.product(loss, params, hvp_method)
        self.loss, self.params, self.train_loader, self.device = loss, params, train_loader, device
        self._store: OutputJacobian | bool | None = None if store and curvature.storable else False

    def __call__(self, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
        if isinstance(batch, RowBatch):
            return self.stored().product(batch, vectors)  # type: ignore[union-attr]
        return self.autograd(batch, vectors)

    def stored(self) -> OutputJacobian | None:
        """The stored output Jacobian, built on first call when it applies; None when the products use autograd."""
        if self._store is None:
            self._store = False
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    self._store = build_output_jacobian(self.loss, self.params, self.train_loader, self.device,
                                                        self.autograd) or False
                except Exception:  # noqa: BLE001 - a model the store cannot handle keeps the autograd products
                    self._store = False
        return self._store if isinstance(self._store, OutputJacobian) else None

    def indices(self, examples: int | None, seed: int) -> list[int] | None:
        """The dataset indices of the seeded training subset (None when the data is not a map-style loader)."""
        loader: Any = self.train_loader
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            return None
        return subset_indices(len(loader.dataset), examples, seed)  # type: ignore[arg-type]

    def units(self, batches: list[Batch], indices: list[int] | None) -> list[Batch]:
        """``batches`` (of the examples ``indices``) as the products take them: index chunks when stored."""
        if indices is None or self.stored() is None:
            return batches
        return [RowBatch(torch.as_tensor(indices[i : i + ROW_CHUNK])) for i in range(0, len(indices), ROW_CHUNK)]

    def rows_stream(self, batch_size: int, seed: int) -> Iterator[Batch] | None:
        """LiSSA's minibatches as index batches when the Jacobian is stored (the same draws), else None."""
        if self.stored() is None:
            return None
        return row_stream(len(self.train_loader.dataset), batch_size, seed)  # type: ignore[attr-defined]

    def dense_matrix(self, curvature: Curvature, batches: Iterable[Batch], use_store: bool) -> torch.Tensor:
        """The curvature over the whole training set as a ``[P, P]`` matrix (small models): ``F^T F / n`` from the
        stored factors when ``use_store`` and they are kept (the same Gauss-Newton matrix, in the store's dtype:
        rounding about 1e-7 of lambda_max), else ``curvature.matrix`` over ``batches``."""
        stored = self.stored() if use_store else None
        if stored is None:
            return curvature.matrix(self.loss, self.params, batches)
        flat = stored.factors.reshape(stored.factors.shape[0] * stored.factors.shape[1], -1)
        return (flat.T @ flat).div_(stored.factors.shape[0])
