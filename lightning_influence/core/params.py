"""Trainable parameters as a flat vector, and the model state kept during analysis."""

from __future__ import annotations

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def trainable_parameters(model: nn.Module) -> Params:
    """Detached copies (views) of the parameters with ``requires_grad=True``, keyed by name.

    Frozen parameters are left out: they stay as they are in the module and carry no influence.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "Expected the model to have trainable parameters, but none has `requires_grad=True`."
            " Influence is measured with respect to trainable parameters: unfreeze the layers to analyse."
        )
    return params


def num_parameters(params: Params) -> int:
    return sum(p.numel() for p in params.values())


def flatten(tensors: Params | list[torch.Tensor] | tuple[torch.Tensor, ...], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate tensors into one vector (keeping ``batch_dims`` leading dimensions)."""
    values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in values], dim=batch_dims)


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    """Split a flat vector ``[..., P]`` into tensors shaped like ``like`` (leading dims kept)."""
    lead = vector.shape[:-1]
    out, offset = {}, 0
    for name, p in like.items():
        out[name] = vector[..., offset : offset + p.numel()].reshape(*lead, *p.shape)
        offset += p.numel()
    if offset != vector.shape[-1]:
        raise ValueError(f"Expected vectors of length {offset}, but got length {vector.shape[-1]}.")
    return out


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
