"""Layer-factored scoring: ``s . grad L(z_i)`` without forming per-example gradients.

For a linear layer ``y = W a + b`` the per-example gradient is an outer product,
``dL_i/dW = g_i a_i^T`` with ``g_i = dL_i/dy_i``, so for a test vector ``S`` (shaped like ``W``)

    <S, g_i a_i^T> = g_i^T (S a_i)        and        <s_b, dL_i/db> = s_b . g_i.

One forward pass records each layer's input ``a``, one backward pass of ``sum_i L_i`` gives every ``g_i``
(only input gradients, no weight gradients), and the k test vectors cost one extra matmul of the layer's size
each. Convolutions form their small per-example weight gradient ``g_i unfold(a_i)^T`` and take dot products.
This is exact (float rounding aside) when every trainable parameter is the weight or bias of a supported
layer (``nn.Linear``, ``nn.Conv2d`` without groups) and example i's loss depends only on example i's
activations — true in ``eval()`` mode. :func:`factored_layers` returns ``None`` for anything else, and the
caller falls back to ``jvp`` or per-example gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.batching import Batch
from lightning_influence.core.tensors.params import Params, unflatten


@dataclass(frozen=True)
class FactoredLayer:
    """A supported layer and the names (in the parameter dict) of its weight and bias."""

    module: nn.Module
    weight: str
    bias: Optional[str]


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


def factored_layers(model: nn.Module, params: Params) -> Optional[list[FactoredLayer]]:
    """The supported layers owning *all* trainable parameters, or ``None`` when any parameter is elsewhere."""
    layers, owned = [], set()
    for name, module in model.named_modules():
        if not _supported(module):
            continue
        prefix = f"{name}." if name else ""
        weight = prefix + "weight"
        bias = prefix + "bias" if module.bias is not None else None
        if weight not in params or (bias is not None and bias not in params):
            continue  # frozen or shared elsewhere: handled only if no trainable parameter is left over
        layers.append(FactoredLayer(module, weight, bias))
        owned.update({weight} | ({bias} if bias else set()))
    if not layers or owned != set(params):
        return None
    return layers


class _Recorder:
    """Forward hooks that keep each call's input and add a zero ``probe`` to its output.

    ``d(sum L)/d probe`` is then ``dL_i/dy_i`` for every example, without weight gradients.
    """

    def __init__(self, layers: list[FactoredLayer]) -> None:
        self.calls: list[tuple[FactoredLayer, torch.Tensor, torch.Tensor]] = []
        self._handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: FactoredLayer):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            probe = torch.zeros_like(output, requires_grad=True)
            self.calls.append((layer, inputs[0].detach(), probe))
            return output + probe

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _linear_scores(a: torch.Tensor, g: torch.Tensor, s_w: torch.Tensor, s_b: Optional[torch.Tensor]) -> torch.Tensor:
    """``[k, B]`` of ``sum_t g_t^T S a_t (+ s_b . g_t)`` for inputs ``a [B, ..., in]``, output grads ``g [B, ..., out]``."""
    batch, k = a.shape[0], s_w.shape[0]
    a = a.reshape(batch, -1, a.shape[-1])  # [B, T, in]
    g = g.reshape(batch, -1, g.shape[-1])  # [B, T, out]
    out_features, in_features = s_w.shape[1], s_w.shape[2]
    if out_features <= in_features:  # (S a) then dot with g: intermediate [B, T, k, out]
        projected = (a @ s_w.reshape(k * out_features, in_features).T).view(batch, -1, k, out_features)
        scores = (projected * g.unsqueeze(2)).sum(dim=(1, 3))
    else:  # (S^T g) then dot with a: intermediate [B, T, k, in]
        projected = (g @ s_w.permute(1, 0, 2).reshape(out_features, k * in_features)).view(batch, -1, k, in_features)
        scores = (projected * a.unsqueeze(2)).sum(dim=(1, 3))
    if s_b is not None:
        scores = scores + g.sum(dim=1) @ s_b.T
    return scores.T


def _conv_scores(
    module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, s_w: torch.Tensor, s_b: Optional[torch.Tensor]
) -> torch.Tensor:
    """``[k, B]`` via the per-example weight gradient ``g_i unfold(a_i)^T`` of a (small) convolution."""
    batch, k = a.shape[0], s_w.shape[0]
    padding: Any = module.padding  # an int tuple: factored layers are checked to use no string padding
    columns = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    g = g.reshape(batch, g.shape[1], -1)  # [B, out, L]
    per_example = torch.bmm(g, columns.transpose(1, 2))  # [B, out, in*kh*kw]
    scores = per_example.reshape(batch, -1) @ s_w.reshape(k, -1).T
    if s_b is not None:
        scores = scores + g.sum(dim=2) @ s_b.T
    return scores.T


def factored_dot(
    loss: FunctionalLoss, params: Params, layers: list[FactoredLayer], batch: Batch, s_vectors: torch.Tensor
) -> torch.Tensor:
    """``[k, B]`` of ``s_j . grad L(z_i)`` for every example of ``batch`` (one forward, one input backward)."""
    tangents = unflatten(s_vectors, params)
    recorder = _Recorder(layers)
    try:
        losses = loss(params, batch)
    finally:
        recorder.remove()
    if not recorder.calls:
        raise RuntimeError("Factored scoring recorded no layer call: the loss does not run the model's layers.")
    probes = [probe for _, _, probe in recorder.calls]
    output_grads = torch.autograd.grad(losses.sum(), probes, allow_unused=True)
    total = s_vectors.new_zeros(s_vectors.shape[0], losses.shape[0])
    for (layer, a, _probe), g in zip(recorder.calls, output_grads):
        if g is None:
            continue
        weight = cast(torch.Tensor, layer.module.weight)
        s_w = tangents[layer.weight].reshape(s_vectors.shape[0], *weight.shape)
        s_b = tangents[layer.bias] if layer.bias else None
        if isinstance(layer.module, nn.Conv2d):
            total += _conv_scores(layer.module, a, g, s_w, s_b)
        else:
            total += _linear_scores(a, g, s_w, s_b)
    return total
