"""The curvature strategy: one object per kind of curvature C, with the properties the rest of the package asks.

Damping, divergence recovery, the spectrum estimate and the stored Jacobian never compare a curvature's name;
they ask its properties:

* ``psd``: positive semi-definite, so any damping > 0 makes ``C + damping I`` positive definite (Gauss-Newton);
  a curvature that is not (the Hessian) gets its damping checked against its most negative eigenvalue;
* ``storable``: its products can come from the stored output Jacobian (:mod:`.jacobian`);
* ``spectrum_steps``: Lanczos steps the damping rule needs (the top eigenvalue alone for a PSD curvature,
  both ends otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import torch

from lightning_influence.config import register_curvature_name
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.params import Params

BatchProduct = Callable[[Batch, torch.Tensor], torch.Tensor]


class Curvature:
    """Base class of the curvatures; a subclass sets the class attributes and implements the two methods."""

    name: ClassVar[str] = ""
    psd: ClassVar[bool] = False
    storable: ClassVar[bool] = False
    spectrum_steps: ClassVar[int] = 30

    def product(self, loss: FunctionalLoss, params: Params, hvp_method: str = "double_backward") -> BatchProduct:
        """``(batch, V) -> C_b V``: the curvature of the mean loss over ``batch`` times each row of ``V``."""
        raise NotImplementedError

    def matrix(self, loss: FunctionalLoss, params: Params, batches: Iterable[Batch]) -> torch.Tensor:
        """The dense ``[P, P]`` curvature of the mean loss over ``batches`` (small models: the exact solver)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Curvature class of each registered name.
CURVATURE_TYPES: dict[str, type[Curvature]] = {}


def register_curvature(curvature_type: type[Curvature]) -> type[Curvature]:
    """Make ``curvature=curvature_type.name`` use ``curvature_type`` (usable as a class decorator)."""
    if not (isinstance(curvature_type, type) and issubclass(curvature_type, Curvature)) or not curvature_type.name:
        raise TypeError(f"Expected a Curvature subclass with a `name`, but got {curvature_type!r}.")
    register_curvature_name(curvature_type.name)
    CURVATURE_TYPES[curvature_type.name] = curvature_type
    return curvature_type


def make_curvature(curvature: str | Curvature) -> Curvature:
    """The curvature object of a registered name (an object is returned as it is)."""
    if isinstance(curvature, Curvature):
        return curvature
    if curvature not in CURVATURE_TYPES:
        raise ValueError(f"Expected `curvature` to be one of {tuple(CURVATURE_TYPES)}, but got {curvature!r}.")
    return CURVATURE_TYPES[curvature]()
