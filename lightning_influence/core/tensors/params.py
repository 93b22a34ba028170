"""Trainable parameters as a flat vector, and the model state kept during analysis."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from torch import nn

Params = dict[str, torch.Tensor]


#: ``parameters=`` selector: module-name prefixes / glob patterns, or a predicate ``(name, param) -> bool``.
ParameterSelector = Union[str, Sequence[str], Callable[[str, nn.Parameter], bool], None]


def trainable_parameters(
    model: nn.Module, parameters: ParameterSelector = None, dtype: Optional[torch.dtype] = None
) -> Params:
    """Detached copies (views) of the parameters with ``requires_grad=True``, keyed by name.

    Frozen parameters are left out: they stay as they are in the module and carry no influence. ``parameters``
    narrows the choice further (see :func:`select_parameters`); ``dtype`` casts (a float32 copy of bf16 weights
    for the analysis; no copy when the dtype already matches).
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "Expected the model to have trainable parameters, but none has `requires_grad=True`."
            " Influence is measured with respect to trainable parameters: unfreeze the layers to analyse."
        )
    if parameters is not None:
        chosen = select_parameters(model, parameters)
        selected = {name: p for name, p in params.items() if name in chosen}
        if not selected:
            names = ", ".join(list(params)[:8])
            raise ValueError(
                f"Expected `parameters` to select at least one trainable parameter, but {parameters!r} matched none."
                f" Trainable parameters are named like: {names}{' ...' if len(params) > 8 else ''}."
            )
        params = selected
    if dtype is not None:
        params = {name: p.to(dtype) for name, p in params.items()}
    return params


def select_parameters(model: nn.Module, parameters: ParameterSelector) -> set[str]:
    """Names of ``model``'s parameters chosen by ``parameters``.

    A string (or each string of a list) selects a parameter when it equals its name, is a module-name prefix of
    it (``"classifier"`` selects ``classifier.weight`` and ``classifier.bias``) or matches it as a glob
    (``"*.lora_*"``, ``"encoder.layer.1.*"``). A callable is called as ``parameters(name, param)``.
    """
    named = list(model.named_parameters())
    if callable(parameters):
        return {name for name, p in named if parameters(name, p)}
    patterns = [parameters] if isinstance(parameters, str) else list(parameters or [])
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            "Expected `parameters` to be a module-name prefix or glob, a list of them, or a callable"
            f" (name, param) -> bool, but got {parameters!r}."
        )

    def matches(name: str, pattern: str) -> bool:
        return name == pattern or name.startswith(pattern.rstrip(".") + ".") or fnmatch.fnmatchcase(name, pattern)

    return {name for name, _ in named if any(matches(name, p) for p in patterns)}


def analysis_dtype(model: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype the analysis runs in: ``dtype`` when given, float64 for a model whose trainable floating
    parameters are all float64 (a reference computation), otherwise float32 (bf16/fp16 weights are upcast)."""
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"Expected `dtype` to be a floating dtype such as torch.float32, but got {dtype}.")
        return dtype
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    return torch.float64 if dtypes == {torch.float64} else torch.float32


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
