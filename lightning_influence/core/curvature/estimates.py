"""Curvature estimates made once per set of weights.

Two analyses of the same weights (the influence and the mislabel callbacks at the end of a fit, or the stages of
one analysis) ask for the same spectrum on the same training subsample. :data:`SPECTRUM_CACHE` keeps the last
``SPECTRUM_CACHE_SIZE`` estimates keyed on :func:`weights_fingerprint` (a hash of the bytes of every parameter and
buffer of the model: any change of a weight, a BatchNorm statistic included, is another key), the losses of the
subsample's first batch (another loss function or another data set is another key), the curvature, the dtype, the
trainable parameters and the subsample. A hit returns the very estimate the first analysis made.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

import torch
from torch import nn

from lightning_influence.config import SPECTRUM_CACHE_SIZE

T = TypeVar("T")


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of named tensors' names, dtypes, shapes and bytes (exact: one changed bit is another digest)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """:func:`tensor_digest` of every parameter and buffer of ``model`` (its ``state_dict``)."""
    with torch.no_grad():
        return tensor_digest(model.state_dict().items())


class EstimateCache(Generic[T]):
    """The last ``size`` values by key (least recently used dropped); ``hits`` counts the reuses."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self._entries: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value kept for ``key``, else ``compute()`` (kept)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        value = compute()
        self._entries[key] = value
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)


#: The process's spectrum estimates (:class:`~lightning_influence.core.curvature.damping.Spectrum` values).
SPECTRUM_CACHE: EstimateCache = EstimateCache(SPECTRUM_CACHE_SIZE)
