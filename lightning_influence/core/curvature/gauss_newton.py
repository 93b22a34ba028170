"""The generalised Gauss-Newton curvature ``G = (1/n) sum_i J_i^T H_out,i J_i``: positive semi-definite for a
convex loss of the outputs (cross-entropy, squared error), so well posed on models that are not converged."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch

from lightning_influence.config import TOP_EIGENVALUE_STEPS
from lightning_influence.core.curvature.base import BatchProduct, Curvature
from lightning_influence.core.curvature.products import GaussNewtonProduct, ggn_matrix
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.params import Params


class GaussNewton(Curvature):
    """Products ``J^T (H_out (J V))`` by reverse-mode autograd (:mod:`.products`) or the stored Jacobian."""

    name: ClassVar[str] = "gauss_newton"
    psd: ClassVar[bool] = True
    storable: ClassVar[bool] = True
    spectrum_steps: ClassVar[int] = TOP_EIGENVALUE_STEPS  # damping="auto" needs only the top eigenvalue

    def product(self, loss: FunctionalLoss, params: Params, hvp_method: str = "double_backward") -> BatchProduct:
        return GaussNewtonProduct(loss, params)

    def matrix(self, loss: FunctionalLoss, params: Params, batches: Iterable[Batch]) -> torch.Tensor:
        return ggn_matrix(loss, params, batches)
