"""Hessian-vector products of the mean training loss, never materialising H (except :func:`hessian`).

All functions take and return *flat* vectors stacked as ``[k, P]`` so several right-hand sides (test
points, power-iteration vectors, identity columns) share one graph.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.func import grad, jvp, vmap

from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch, batch_size_of
from lightning_influence.core.tensors.params import Params, flatten, unflatten

HVP_METHODS = ("double_backward", "forward_over_reverse")


def batch_hvp(
    loss: FunctionalLoss,
    params: Params,
    batch: Batch,
    vectors: torch.Tensor,
    method: str = "double_backward",
) -> torch.Tensor:
    """``H_b V`` for the Hessian ``H_b`` of the mean loss over ``batch`` and ``V`` of shape ``[k, P]``.

    ``double_backward`` differentiates ``grad . v`` (measured 1.2-2.6x faster on CPU);
    ``forward_over_reverse`` is ``jvp`` of ``grad`` (vmapped over the k vectors).
    """
    if method == "forward_over_reverse":
        grad_fn = grad(lambda p: loss.mean(p, batch))

        def one(v: torch.Tensor) -> torch.Tensor:
            return flatten(jvp(grad_fn, (params,), (unflatten(v, params),))[1])

        return vmap(one)(vectors)
    if method != "double_backward":
        raise ValueError(f"Expected `hvp_method` to be one of {HVP_METHODS}, but got {method!r}.")
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    inputs = list(leaves.values())
    grads = torch.autograd.grad(loss.mean(leaves, batch), inputs, create_graph=True, allow_unused=True)
    flat_grad = flatten([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, inputs)])
    if not flat_grad.requires_grad:  # the loss is linear in the parameters: H = 0
        return torch.zeros_like(vectors)
    rows = [_vjp(flat_grad, inputs, v, retain=i < len(vectors) - 1) for i, v in enumerate(vectors)]
    return torch.stack(rows)


def _vjp(flat_grad: torch.Tensor, inputs: list[torch.Tensor], v: torch.Tensor, retain: bool) -> torch.Tensor:
    out = torch.autograd.grad(flat_grad, inputs, grad_outputs=v, retain_graph=retain, allow_unused=True)
    return flatten([o if o is not None else torch.zeros_like(p) for o, p in zip(out, inputs)]).detach()


def dataset_hvp(
    loss: FunctionalLoss,
    params: Params,
    batches: Iterable[Batch],
    vectors: torch.Tensor,
    method: str = "double_backward",
) -> torch.Tensor:
    """``H V`` for the Hessian of the mean loss over all examples of ``batches`` (weighted by batch size)."""
    total = torch.zeros_like(vectors)
    count = 0
    for batch in batches:
        size = batch_size_of(batch)
        total += size * batch_hvp(loss, params, batch, vectors, method)
        count += size
    if count == 0:
        raise ValueError("Expected the training data to hold at least one example, but it is empty.")
    return total / count


def hessian(loss: FunctionalLoss, params: Params, batches: Iterable[Batch], chunk_size: int = 64) -> torch.Tensor:
    """The full ``[P, P]`` Hessian of the mean training loss, built from HVPs with identity columns.

    Costs P/chunk_size passes over the data and P^2 floats: only for small models (the exact reference).
    """
    batches = list(batches)
    size = sum(p.numel() for p in params.values())
    first = next(iter(params.values()))
    rows = []
    for start in range(0, size, chunk_size):
        stop = min(start + chunk_size, size)
        eye = torch.zeros(stop - start, size, dtype=first.dtype, device=first.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        rows.append(dataset_hvp(loss, params, batches, eye, method="forward_over_reverse"))
    matrix = torch.cat(rows)
    return 0.5 * (matrix + matrix.T)
