"""Batches as nested tuples/lists/dicts of tensors: device moves, sizes, slicing."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

Batch = Any


def prepare_batch(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of ``batch`` to ``device``.

    Tensors created under ``torch.inference_mode`` (e.g. cached in a validation hook) cannot take part in
    autograd, so they are cloned into normal tensors.
    """

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if leaf.is_inference():
            with torch.inference_mode(False):
                leaf = leaf.clone()
        return leaf.to(device)

    return tree_map(move, batch)


def batch_size_of(batch: Batch) -> int:
    """Number of examples in ``batch``: the first dimension of its first tensor."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError(
        f"Expected a batch holding at least one tensor with a batch dimension, but got {type(batch).__name__}."
        " Batches may be tensors, or tuples, lists and dicts of tensors."
    )


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of every batched tensor in ``batch``."""
    return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def add_batch_dim(example: Batch) -> Batch:
    """Turn a single example (as seen inside ``vmap``) back into a batch of one."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)


def batched_in_dims(batch: Batch) -> Any:
    """``vmap`` in_dims for ``batch``: 0 for batched tensors, None for everything else."""
    return tree_map(lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 else None, batch)
