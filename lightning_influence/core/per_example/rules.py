"""Per-layer rules for per-example gradients in factored form (used by :mod:`~lightning_influence.core.per_example.engine`).

A forward hook records what a layer needs (its input, or its normalised input for norm layers) and the engine
gets ``g = dL_i/dy_i``, the gradient of example i's loss with respect to the layer's output, from one backward
pass of ``sum_i L_i`` (the examples are independent in ``eval()`` mode). From ``(feature, g)`` a rule gives

* ``dot``: ``[k, B]`` of ``<S_j, dL_i/dtheta>`` for k test vectors ``S`` without forming per-example gradients
  when that is cheaper, and
* ``grads``: the per-example gradients ``{local name: [B, *shape]}`` (used for the few test points).

Every rule handles its layer's weight and bias; an absent (frozen) one is skipped. Leading dimensions beyond the
batch (tokens, positions, pixels) are summed over, which is what the per-example gradient does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

Tangents = dict[str, torch.Tensor]  # local name ("weight"/"bias") -> [k, *param shape]
Grads = dict[str, torch.Tensor]  # local name -> [B, *param shape]

#: A torch module as the rules use it: its attributes (padding, weight, ...) are dynamic, which a type checker
#: sees as ``Tensor | Module``.
Layer = Any


class LayerRule:
    """How one layer type contributes to per-example gradients. Subclasses override the three methods."""

    kind = "layer"

    def supports(self, module: Layer) -> Optional[str]:
        """``None`` when the rule applies to ``module`` as configured, else why not (a short phrase)."""
        return None

    def feature(self, module: Layer, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return inputs[0].detach()

    def grads(self, module: Layer, a: torch.Tensor, g: torch.Tensor, names: set[str]) -> Grads:
        raise NotImplementedError

    def column_grads(self, module: Layer, a: torch.Tensor, gs: torch.Tensor, names: set[str]) -> list[Grads]:
        """:meth:`grads` for the output gradients ``gs [C, B, ...]`` of one forward pass (the stored Jacobian's
        columns), one dict per column."""
        return [self.grads(module, a, g, names) for g in gs]

    def dot(self, module: Layer, a: torch.Tensor, g: torch.Tensor, s: Tangents) -> torch.Tensor:
        grads = self.grads(module, a, g, set(s))
        return cast(torch.Tensor, sum(s[n].reshape(s[n].shape[0], -1) @ grads[n].reshape(grads[n].shape[0], -1).T
                                      for n in s))


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``[B, ..., D] -> [B, T, D]``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _matrix_dot(a: torch.Tensor, g: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``[k, B]`` of ``sum_t g_t^T S a_t`` for ``a [B, T, in]``, ``g [B, T, out]``, ``S [k, out, in]``.

    Picks the cheaper of projecting every token (``[B, T, k, min(in, out)]`` floats) and forming the per-example
    gradient ``sum_t g_t a_t^T`` (``[B, out, in]`` floats).
    """
    batch, tokens, k = a.shape[0], a.shape[1], s_w.shape[0]
    out_f, in_f = s_w.shape[1], s_w.shape[2]
    if tokens * k * min(in_f, out_f) > out_f * in_f:
        per_example = torch.bmm(g.transpose(1, 2), a)  # [B, out, in]
        return s_w.reshape(k, -1) @ per_example.reshape(batch, -1).T
    if out_f <= in_f:
        projected = (a @ s_w.reshape(k * out_f, in_f).T).view(batch, tokens, k, out_f)
        return (projected * g.unsqueeze(2)).sum(dim=(1, 3)).T
    projected = (g @ s_w.permute(1, 0, 2).reshape(out_f, k * in_f)).view(batch, tokens, k, in_f)
    return (projected * a.unsqueeze(2)).sum(dim=(1, 3)).T


class LinearRule(LayerRule):
    """``nn.Linear``: ``y = a W^T + b`` on inputs ``[B, ..., in]``; per-example ``dW = sum_t g_t a_t^T``."""

    kind = "linear"
    transposed = False  # Hugging Face Conv1D stores W as [in, out]

    def _w(self, s_w: torch.Tensor) -> torch.Tensor:
        return s_w.transpose(1, 2) if self.transposed else s_w

    def grads(self, module: Layer, a: torch.Tensor, g: torch.Tensor, names: set[str]) -> Grads:
        a, g = _tokens(a), _tokens(g)
        out: Grads = {}
        if "weight" in names:
            w = torch.bmm(g.transpose(1, 2), a)
            out["weight"] = w.transpose(1, 2) if self.transposed else w
        if "bias" in names:
            out["bias"] = g.sum(dim=1)
        return out

    def column_grads(self, module: Layer, a: torch.Tensor, gs: torch.Tensor, names: set[str]) -> list[Grads]:
        """:meth:`grads` for the output gradients ``gs [C, B, ..., out]``: the weight's by one batched product over
        the C columns stacked."""
        a = _tokens(a)
        columns, batch, outputs = gs.shape[0], gs.shape[1], gs.shape[-1]
        g = gs.reshape(columns, batch, -1, outputs)  # [C, B, T, out]
        found: list[Grads] = [{} for _ in range(columns)]
        if "weight" in names:
            stacked = torch.bmm(g.permute(1, 0, 3, 2).reshape(batch, columns * outputs, -1), a)
            stacked = stacked.view(batch, columns, outputs, a.shape[-1])
            for c in range(columns):
                found[c]["weight"] = stacked[:, c].transpose(1, 2) if self.transposed else stacked[:, c]
        if "bias" in names:
            for c in range(columns):
                found[c]["bias"] = g[c].sum(dim=1)
        return found

    def dot(self, module: Layer, a: torch.Tensor, g: torch.Tensor, s: Tangents) -> torch.Tensor:
        a, g = _tokens(a), _tokens(g)
        total: Any = 0
        if "weight" in s:
            total = _matrix_dot(a, g, self._w(s["weight"]))
        if "bias" in s:
            total = total + s["bias"] @ g.sum(dim=1).T
        return total  # type: ignore[return-value]


class HFConv1DRule(LinearRule):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2): ``y = a W + b`` with ``W [in, out]``."""

    kind = "hf_conv1d"
    transposed = True


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any stride, dilation, padding mode, groups) through ``unfold``."""

    kind = "conv"

    def supports(self, module: Layer) -> Optional[str]:
        return None if isinstance(module, (nn.Conv1d, nn.Conv2d)) else "only Conv1d/Conv2d"

    @staticmethod
    def _unfold_padding(module: Layer) -> Optional[tuple]:
        """Zero padding that ``unfold`` can apply itself (symmetric), else None (padded in the hook)."""
        pad = module._reversed_padding_repeated_twice  # type: ignore[attr-defined]
        if module.padding_mode != "zeros" or any(pad[i] != pad[i + 1] for i in range(0, len(pad), 2)):
            return None
        return tuple(pad[::2][::-1])

    def feature(self, module: Layer, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        a = inputs[0].detach()
        pad = module._reversed_padding_repeated_twice  # type: ignore[attr-defined]
        if any(pad) and self._unfold_padding(module) is None:
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode  # type: ignore[attr-defined]
            a = F.pad(a, pad, mode=mode)
        return a

    def _columns(self, module: Layer, a: torch.Tensor) -> torch.Tensor:
        """``[B, G, C_in/G * K, L]`` unfolded inputs."""
        conv1d = isinstance(module, nn.Conv1d)
        pair: Callable[[tuple], tuple] = (lambda t: (1, t[0])) if conv1d else (lambda t: tuple(t))
        padding = self._unfold_padding(module) or (0,) * (1 if conv1d else 2)
        if conv1d:
            a, padding = a.unsqueeze(2), (0, padding[0])
        columns = F.unfold(a, pair(module.kernel_size), dilation=pair(module.dilation),  # type: ignore[arg-type]
                           padding=padding, stride=pair(module.stride))  # type: ignore[arg-type]
        groups = module.groups  # type: ignore[attr-defined]
        return columns.view(a.shape[0], groups, -1, columns.shape[-1])

    def _split_g(self, module: Layer, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], module.groups, -1, g[0, 0].numel())  # type: ignore[attr-defined]

    @staticmethod
    def _per_example(gg: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``[B, G, O/G, P]`` per-example weight gradients ``g_i unfold(a_i)^T`` (bmm when there is one group)."""
        if gg.shape[1] == 1:
            return torch.bmm(gg[:, 0], columns[:, 0].transpose(1, 2)).unsqueeze(1)
        return torch.einsum("bgol,bgpl->bgop", gg, columns)

    def grads(self, module: Layer, a: torch.Tensor, g: torch.Tensor, names: set[str]) -> Grads:
        return self._grads(module, self._columns(module, a) if "weight" in names else a, g, names)

    def column_grads(self, module: Layer, a: torch.Tensor, gs: torch.Tensor, names: set[str]) -> list[Grads]:
        """:meth:`grads` for several output gradients, the input unfolded once for all of them."""
        columns = self._columns(module, a) if "weight" in names else a
        if "weight" not in names or columns.shape[1] != 1:
            return [self._grads(module, columns, g, names) for g in gs]
        count, batch, outputs = gs.shape[0], gs.shape[1], gs.shape[2]
        stacked = torch.bmm(gs.permute(1, 0, 2, *range(3, gs.dim())).reshape(batch, count * outputs, -1),
                            columns[:, 0].transpose(1, 2)).view(batch, count, *module.weight.shape)
        found: list[Grads] = []
        for c in range(count):
            found.append({"weight": stacked[:, c]})
            if "bias" in names:
                found[c]["bias"] = gs[c].reshape(batch, outputs, -1).sum(dim=2)
        return found

    def _grads(self, module: Layer, columns: torch.Tensor, g: torch.Tensor, names: set[str]) -> Grads:
        out: Grads = {}
        if "weight" in names:
            per_example = self._per_example(self._split_g(module, g), columns)
            out["weight"] = per_example.reshape(g.shape[0], *module.weight.shape)  # type: ignore[union-attr]
        if "bias" in names:
            out["bias"] = g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2)
        return out

    def dot(self, module: Layer, a: torch.Tensor, g: torch.Tensor, s: Tangents) -> torch.Tensor:
        total: Any = 0
        if "weight" in s:
            columns, gg = self._columns(module, a), self._split_g(module, g)
            batch, groups, per_out, length = gg.shape
            k = s["weight"].shape[0]
            s_w = s["weight"].reshape(k, groups, per_out, -1)  # [k, G, O/G, P]
            if k * per_out * length > per_out * columns.shape[2]:  # per-example gradients are smaller
                per_example = self._per_example(gg, columns)
                total = s_w.reshape(k, -1) @ per_example.reshape(batch, -1).T
            else:
                projected = torch.einsum("kgop,bgpl->bkgol", s_w, columns)
                total = (projected * gg.unsqueeze(1)).sum(dim=(2, 3, 4)).T
        if "bias" in s:
            total = total + s["bias"] @ g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2).T
        return total  # type: ignore[return-value]


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: example i's gradient scatters ``g_t`` onto rows ``ids_t`` (``padding_idx`` rows get none).

    ``<S, dW_i> = sum_t S[ids_t] . g_t``: a gather of the used rows of S, never a ``[B, V, D]`` tensor.
    """

    kind = "embedding"

    def supports(self, module: Layer) -> Optional[str]:
        if module.max_norm is not None:  # type: ignore[union-attr]
            return "max_norm renormalises rows in the forward"
        if module.scale_grad_by_freq:  # type: ignore[union-attr]
            return "scale_grad_by_freq couples positions"
        return None

    def _masked(self, module: Layer, ids: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, g = ids.reshape(ids.shape[0], -1), _tokens(g)
        if module.padding_idx is not None:  # type: ignore[union-attr]
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)  # type: ignore[union-attr]
        return ids, g

    def grads(self, module: Layer, a: torch.Tensor, g: torch.Tensor, names: set[str]) -> Grads:
        ids, g = self._masked(module, a, g)
        batch, rows = ids.shape[0], module.num_embeddings  # type: ignore[union-attr]
        flat = (ids + rows * torch.arange(batch, device=ids.device).unsqueeze(1)).reshape(-1)
        out = g.new_zeros(batch * rows, g.shape[-1]).index_add_(0, flat, g.reshape(-1, g.shape[-1]))
        return {"weight": out.view(batch, rows, -1)}

    def dot(self, module: Layer, a: torch.Tensor, g: torch.Tensor, s: Tangents) -> torch.Tensor:
        ids, g = self._masked(module, a, g)
        s_w = s["weight"]  # [k, V, D]
        rows = s_w[:, ids.reshape(-1)].view(s_w.shape[0], ids.shape[0], ids.shape[1], -1)  # [k, B, T, D]
        return (rows * g.unsqueeze(0)).sum(dim=(2, 3))


class NormRule(LayerRule):
    """Affine norms ``y = xhat * w + b``: per-example ``dw = sum g * xhat``, ``db = sum g`` over the non-parameter
    dimensions. ``xhat`` is recomputed from the input in the hook (running statistics for BatchNorm)."""

    kind = "norm"

    def supports(self, module: Layer) -> Optional[str]:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                return "BatchNorm in training mode couples the batch"
            if module.running_mean is None or module.running_var is None:
                return "BatchNorm without running statistics normalises with batch statistics"
        return None

    def feature(self, module: Layer, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        a = inputs[0].detach()
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(a, module.num_groups, None, None, module.eps)
        if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
            return F.rms_norm(a, module.normalized_shape, None, module.eps)
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean, var = module.running_mean.view(shape), module.running_var.view(shape)  # type: ignore[union-attr]
        return (a - mean) * torch.rsqrt(var + module.eps)

    def _reduce(self, module: Layer, t: torch.Tensor) -> torch.Tensor:
        """Sum ``[B, ...]`` over everything but the batch and the parameter's own dimensions."""
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)  # channels at dim 1
        shape = tuple(module.normalized_shape)  # type: ignore[union-attr]
        return t.reshape(t.shape[0], -1, *shape).sum(dim=1)

    def grads(self, module: Layer, a: torch.Tensor, g: torch.Tensor, names: set[str]) -> Grads:
        out: Grads = {}
        if "weight" in names:
            out["weight"] = self._reduce(module, g * a)
        if "bias" in names:
            out["bias"] = self._reduce(module, g)
        return out


def _is_hf_conv1d(module: Layer) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def rule_for(module: Layer, parent: Optional[nn.Module]) -> tuple[Optional[LayerRule], str]:
    """The rule for ``module`` and, when there is none, why (a short phrase for the plan's note)."""
    if isinstance(module, nn.Linear):
        if isinstance(parent, nn.MultiheadAttention):
            return None, "MultiheadAttention calls its out_proj weights directly"
        rule: LayerRule = LinearRule()
    elif _is_hf_conv1d(module):
        rule = HFConv1DRule()
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        rule = ConvRule()
    elif isinstance(module, nn.Embedding):
        rule = EmbeddingRule()
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
        hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)
    ):
        rule = NormRule()
    else:
        return None, f"no hook rule for {type(module).__name__}"
    why = rule.supports(module)
    return (None, f"{type(module).__name__}: {why}") if why else (rule, "")
