"""Features for the candidate (kNN) search: the last linear layer's input, or its loss gradients in factored form.

For the last linear layer ``y = W a + b`` with output gradient ``g_i = dL_i/dy_i``, example i's gradient is
``g_i a_i^T`` (and ``g_i`` for the bias), and ``<g_q a_q^T, g_i a_i^T> = (g_q . g_i)(a_q . a_i)``: the inner
product of last-layer gradients without materialising the ``out x in`` matrices (see
:mod:`lightning_influence.core.candidates`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lightning_influence.config import ACTIVATIONS, LAST_LAYER_GRAD, check_feature_choice
from lightning_influence.core.tensors.batching import Batch, model_input, prepare_batch

FeatureFn = Callable[[nn.Module, Batch], torch.Tensor]
#: Entries of the ``[q, b, D]`` products formed at once by :func:`factored_similarity`.
_SIMILARITY_BLOCK = 1 << 22


def last_linear_input(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``[B, D]``: the input of the last ``nn.Linear`` leaf module called in ``model``'s forward pass.

    ``batch`` is a batch as ``loss_fn`` sees it; ``model`` is called on its first tensor (``batch[0]`` of a
    tuple/list, ``batch["input"]``-style keys of a dict, or the tensor itself). For other layouts pass a
    ``feature_fn``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and not list(m.children())]
    if not linears:
        raise ValueError(
            f"Expected `model` ({type(model).__name__}) to contain an nn.Linear layer whose input serves as the"
            " features for candidate preselection, but it has none. Pass `feature_fn=lambda model, batch: ...`"
            " returning a Tensor[B, D] of features."
        )
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, args, _out: captured.append(args[0])) for m in linears]
    try:
        model(_model_input(batch))
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError(
            "No nn.Linear layer of `model` ran in its forward pass, so there are no features for candidate"
            " preselection. Pass `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
        )
    return captured[-1]


@dataclass(frozen=True)
class GradientFactors:
    """Per-example last-layer loss gradients in factored form: example i's gradient is ``out_grads[i] inputs[i]^T``.

    ``out_grads [B, O]`` = ``dL_i/dy_i`` at the last ``nn.Linear``; ``inputs [B, I]`` its input (with a trailing
    1 when the layer has a bias, which adds the bias gradient ``g_i`` to the inner product).
    """

    out_grads: torch.Tensor
    inputs: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, O * I)``: the batch size and the width of the flattened gradients."""
        return self.out_grads.shape[0], self.out_grads.shape[1] * self.inputs.shape[1]

    def to(self, device: torch.device | str) -> GradientFactors:
        return GradientFactors(self.out_grads.to(device), self.inputs.to(device))

    def cpu(self) -> GradientFactors:
        return self.to("cpu")

    def flat(self) -> torch.Tensor:
        """``[B, O * I]`` the explicit gradients (for checks; the search never forms them)."""
        return (self.out_grads[:, :, None] * self.inputs[:, None, :]).reshape(self.out_grads.shape[0], -1)


def last_layer_gradients(model: nn.Module, batch: Batch, loss_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> GradientFactors:
    """Per-example gradients of ``loss_fn``'s losses w.r.t. the last ``nn.Linear`` leaf that runs, factored.

    The layer's output is made a leaf of the graph (its value is unchanged), so ``dL_i/dy_i`` is one backward
    pass of ``sum_i L_i`` whether or not the parameters require gradients. Needs per-example losses ``[B]``
    where ``L_i`` depends on row i only (eval mode) and a 2-D layer output ``[B, O]``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and not list(m.children())]
    if not linears:
        raise ValueError(
            f"feature_fn={LAST_LAYER_GRAD!r} needs an nn.Linear layer in `model` ({type(model).__name__}), but it"
            " has none. Pass `feature_fn=lambda model, batch: ...` returning a Tensor[B, D] of features."
        )
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        calls.append((module, args[0].detach(), leaf))
        return leaf

    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with torch.enable_grad():
            losses = loss_fn(model, batch)
            if not calls:
                raise ValueError(
                    f"No nn.Linear layer of `model` ran in `loss_fn`, so feature_fn={LAST_LAYER_GRAD!r} has no"
                    " gradients to use. Pass `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
                )
            module, inputs, output = calls[-1]
            if output.dim() != 2 or losses.dim() != 1 or losses.shape[0] != output.shape[0]:
                raise ValueError(
                    f"feature_fn={LAST_LAYER_GRAD!r} needs per-example losses [B] and a last nn.Linear output [B, O],"
                    f" but got losses of shape {tuple(losses.shape)} and output {tuple(output.shape)}. Pass"
                    " feature_fn='activations' or `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
                )
            (out_grads,) = torch.autograd.grad(losses.sum(), output, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if out_grads is None:
        out_grads = torch.zeros_like(output)
    if module.bias is not None:  # type: ignore[union-attr]
        inputs = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)
    return GradientFactors(out_grads.detach(), inputs)


def factored_similarity(queries: GradientFactors, keys: GradientFactors) -> torch.Tensor:
    """``[q, b]`` inner products ``<g_q a_q^T, g_j a_j^T> = (g_q . g_j)(a_q . a_j)`` in float64.

    Each entry is an elementwise product summed over its own row (no matmul), so it does not depend on how the
    keys are blocked: candidate sets stay the same for any chunking and number of processes.
    """
    return _pairwise_dot(queries.out_grads, keys.out_grads) * _pairwise_dot(queries.inputs, keys.inputs)


def _pairwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.to(a.device).double()
    step = max(1, _SIMILARITY_BLOCK // max(1, a.shape[0] * a.shape[1]))
    return torch.cat([(a[:, None, :] * b[None, start : start + step, :]).sum(-1) for start in range(0, b.shape[0], step)]
                     or [a.new_empty(a.shape[0], 0)], dim=1)


def _model_input(batch: Batch) -> torch.Tensor:
    found = model_input(batch)
    if found is None:
        raise ValueError(
            f"Cannot tell the model input in a batch of type {type(batch).__name__} for candidate features. Pass"
            " `feature_fn=lambda model, batch: ...` returning a Tensor[B, D]."
        )
    return found


def batch_features(
    model: nn.Module, batch: Batch, feature_fn: FeatureFn | str | None, device: torch.device,
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
) -> torch.Tensor | GradientFactors:
    """``[B, D]`` float features of ``batch`` (no gradients), from ``feature_fn`` or (None, ``"activations"``)
    :func:`last_linear_input`; with ``feature_fn="last_layer_grad"`` the :class:`GradientFactors` of
    ``loss_fn``'s per-example losses. (Callers resolve the default first: :func:`resolve_feature_fn`.)"""
    batch = prepare_batch(batch, device)
    if feature_fn == ACTIVATIONS:
        feature_fn = last_linear_input
    if isinstance(feature_fn, str):
        check_feature_choice(feature_fn, "torch")
        if loss_fn is None:
            raise ValueError(f"feature_fn={LAST_LAYER_GRAD!r} needs the loss function, but none was given.")
        return last_layer_gradients(model, batch, loss_fn)
    with torch.no_grad():
        features = (feature_fn or last_linear_input)(model, batch)
    if not isinstance(features, torch.Tensor) or features.dim() < 1:
        raise ValueError(f"Expected features to be a Tensor[B, D], but got {type(features).__name__}.")
    features = features.detach().reshape(features.shape[0], -1)
    return features if features.is_floating_point() else features.float()
