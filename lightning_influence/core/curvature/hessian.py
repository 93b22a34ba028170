"""The true Hessian of the mean training loss: indefinite before convergence, so its damping is checked against
the most negative eigenvalue (:mod:`.damping`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch

from lightning_influence.config import SPECTRUM_STEPS
from lightning_influence.core.curvature.base import BatchProduct, Curvature
from lightning_influence.core.curvature.hvp import batch_hvp, hessian
from lightning_influence.core.curvature.products import twice_differentiable
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.params import Params


class Hessian(Curvature):
    """Hessian-vector products by double backward or forward-over-reverse (``hvp_method``)."""

    name: ClassVar[str] = "hessian"
    psd: ClassVar[bool] = False
    storable: ClassVar[bool] = False
    spectrum_steps: ClassVar[int] = SPECTRUM_STEPS  # both ends: the negative-curvature check needs lambda_min

    def product(self, loss: FunctionalLoss, params: Params, hvp_method: str = "double_backward") -> BatchProduct:
        def hvp(batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
            with twice_differentiable():
                return batch_hvp(loss, params, batch, vectors, hvp_method)

        return hvp

    def matrix(self, loss: FunctionalLoss, params: Params, batches: Iterable[Batch]) -> torch.Tensor:
        return hessian(loss, params, batches)
