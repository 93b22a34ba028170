"""Curvature of the training loss: the curvature kinds (one object each, with a registry), their products, the
stored output Jacobian, damping and the Kronecker-factored preconditioners.

A new curvature is one file with a :class:`Curvature` subclass plus ``register_curvature(NewCurvature)``; see
docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_influence.core.curvature.base import (
    CURVATURE_TYPES,
    BatchProduct,
    Curvature,
    make_curvature,
    register_curvature,
)
from lightning_influence.core.curvature.gauss_newton import GaussNewton
from lightning_influence.core.curvature.hessian import Hessian
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.params import Params

register_curvature(GaussNewton)
register_curvature(Hessian)


def batch_product(loss: FunctionalLoss, params: Params, curvature: str | Curvature,
                  hvp_method: str = "double_backward") -> BatchProduct:
    """``(batch, V) -> C_b V`` for a registered curvature (name or object)."""
    return make_curvature(curvature).product(loss, params, hvp_method)


def curvature_matrix(loss: FunctionalLoss, params: Params, batches: Iterable[Batch],
                     curvature: str | Curvature) -> torch.Tensor:
    """The dense ``[P, P]`` curvature of the mean training loss (small models only: the exact reference)."""
    return make_curvature(curvature).matrix(loss, params, batches)


__all__ = ["CURVATURE_TYPES", "BatchProduct", "Curvature", "GaussNewton", "Hessian", "batch_product",
           "curvature_matrix", "make_curvature", "register_curvature"]
