"""Kronecker-factored preconditioners for the Gauss-Newton curvature: K-FAC and eigenvalue-corrected K-FAC.

For a ``nn.Linear`` or ``nn.Conv2d`` layer with inputs ``a`` (unfolded patches for a convolution, a constant 1
appended when the layer has a bias) and output gradients ``g``, the layer's block of the Gauss-Newton matrix
``G = (1/n) sum_i J_i^T H_i J_i`` is approximated by ``A (x) S`` with

* ``A = mean over examples and positions of a a^T``;
* ``S = mean over examples of sum over positions and columns c of g_c g_c^T``, where ``g_c`` is the output
  gradient for the cotangent ``u_c``, the c-th column of a square root of the per-example output Hessian
  ``H_i = sum_c u_c u_c^T`` (so ``sum_c`` of the squared products is the Gauss-Newton quadratic form exactly).

``A = Q_A diag(l_A) Q_A^T`` and ``S = Q_S diag(l_S) Q_S^T`` give ``(A (x) S + damping I)^-1`` in closed form:
rotate the layer's piece ``W`` of a vector to ``Q_S^T W Q_A``, divide by ``l_S l_A^T + damping``, rotate back.
EK-FAC (George et al. 2018) keeps the eigenbasis but replaces ``l_S l_A^T`` by the curvature's own diagonal in
that basis, ``mean_i sum_c (Q_S^T dW_ic Q_A)^2`` (``dW_ic`` the per-example, per-column weight gradient), one more
pass over the data. Parameters outside such layers get a diagonal (Hutchinson estimate of ``diag G``).

The factors come from one pass over a fixed training subset (two for EK-FAC); a ``reduce`` callable (the
distributed layer passes an all-reduce sum) combines per-rank sums, one call per pass (and one for the diagonal
when some parameters lie outside Linear/Conv2d layers). Built preconditioners are
cached per model while its weights do not change (parameter version counters), independent of the damping.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lightning_influence.config import PRECONDITIONERS
from lightning_influence.core.curvature.products import BatchProduct, split_forward, split_module
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.per_example.rules import ConvRule
from lightning_influence.core.tensors.batching import Batch, batch_size_of, slice_batch
from lightning_influence.core.tensors.params import Params

#: Per-example model outputs up to this size use the exact square root of the output Hessian (one backward per
#: output); larger outputs (language models) use the gradient of the loss itself (the empirical Fisher).
MAX_EXACT_OUTPUTS = 64
#: Rademacher probes of the Hutchinson diagonal for parameters outside Linear/Conv2d layers.
DIAGONAL_PROBES = 8
Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Layer:
    """A Linear/Conv2d layer whose weight (and bias, if trainable) are analysed: its factors and eigenbases."""

    module: nn.Module
    weight: str  # global parameter names
    bias: Optional[str]
    conv: bool
    a_sum: Optional[torch.Tensor] = None
    s_sum: Optional[torch.Tensor] = None
    a_count: float = 0.0
    q_a: Optional[torch.Tensor] = None
    q_s: Optional[torch.Tensor] = None
    eigenvalues: Optional[torch.Tensor] = None  # [out, in(+1)]: l_S l_A^T (K-FAC) or the corrected diagonal
    corrected: Optional[torch.Tensor] = None


@dataclass
class KroneckerPreconditioner:
    """``(C_approx + damping I)^-1`` for rows of ``[k, P]`` vectors laid out like ``params``.

    Attributes:
        kind: ``"kfac"`` or ``"ekfac"``.
        layers: the Kronecker-factored layers.
        diagonal: ``diag C`` estimates for the remaining parameters (a ``[P]`` tensor, 0 on factored layers).
        offsets: ``{name: (start, shape)}`` of each parameter in the flat vector.
    """

    kind: str
    layers: list[_Layer]
    diagonal: torch.Tensor
    offsets: dict[str, tuple[int, torch.Size]] = field(default_factory=dict)

    def _piece(self, vectors: torch.Tensor, name: str) -> torch.Tensor:
        start, shape = self.offsets[name]
        return vectors[:, start : start + shape.numel()]

    def apply(self, vectors: torch.Tensor, damping: float, power: float = 1.0) -> torch.Tensor:
        """``(C_approx + damping I)^-power V`` for ``V [k, P]`` (``damping`` must be > 0 where ``C_approx`` is 0);
        ``power=0.5``: the symmetric root, for a preconditioned recursion that stays symmetric."""
        out = vectors / (self.diagonal.to(vectors) + damping) ** power
        k = vectors.shape[0]
        for layer in self.layers:
            assert layer.q_a is not None and layer.q_s is not None and layer.eigenvalues is not None
            w = self._piece(vectors, layer.weight).reshape(k, layer.q_s.shape[0], -1)
            if layer.bias is not None:
                w = torch.cat([w, self._piece(vectors, layer.bias)[:, :, None]], dim=2)
            q_a, q_s = layer.q_a.to(vectors), layer.q_s.to(vectors)
            rotated = q_s.T @ w @ q_a
            rotated = rotated / (layer.eigenvalues.to(vectors) + damping) ** power
            back = q_s @ rotated @ q_a.T
            n_w = back.shape[2] - (1 if layer.bias is not None else 0)
            self._piece(out, layer.weight).copy_(back[:, :, :n_w].reshape(k, -1))
            if layer.bias is not None:
                self._piece(out, layer.bias).copy_(back[:, :, n_w])
        return out


def factored_layers(model: nn.Module, params: Params) -> list[_Layer]:
    """The Linear/Conv2d layers (one group, weight analysed, each weight used by one module) of ``model``."""
    names = {id(p): n for n, p in model.named_parameters() if n in params}
    owners: dict[str, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in names:
                owners[names[id(p)]] = owners.get(names[id(p)], 0) + 1
    layers = []
    for module in model.modules():
        conv = isinstance(module, nn.Conv2d)
        if not (isinstance(module, nn.Linear) or (conv and module.groups == 1)):
            continue
        weight = names.get(id(module.weight))
        bias = names.get(id(module.bias)) if module.bias is not None else None
        if weight is None or owners.get(weight) != 1 or (bias is not None and owners.get(bias) != 1):
            continue
        layers.append(_Layer(module, weight, bias, conv))
    return layers


class _Recorder:
    """Forward hooks on the factored layers: each call's input (unfolded, with a bias column) and a zero probe
    added to its output whose gradient is the layer's output gradient."""

    def __init__(self, layers: list[_Layer]) -> None:
        self.calls: list[tuple[_Layer, torch.Tensor, torch.Tensor]] = []
        self._handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: _Layer) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            a = inputs[0].detach()
            if layer.conv:
                rule = ConvRule()
                a = rule._columns(module, rule.feature(module, inputs, output))[:, 0].transpose(1, 2)  # [B, L, in]
            else:
                a = a.reshape(a.shape[0], -1, a.shape[-1])  # [B, T, in]
            if layer.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            probe = torch.zeros_like(output, requires_grad=True)
            self.calls.append((layer, a, probe))
            return output + probe

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _output_gradients(layer: _Layer, g: torch.Tensor) -> torch.Tensor:
    """``[C, B, T, out]`` output gradients of a layer from the probe gradient ``[C, B, *output shape]``."""
    if layer.conv:
        return g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _cotangents(split: Any, batch_size: int) -> Optional[list[torch.Tensor]]:
    """Columns ``u_c`` of a square root of each example's output Hessian, shaped like the outputs with a leading
    column dimension ``[M, B, ...]``; None when the outputs are not per example or too large."""
    leaves = split.leaves
    if any(leaf.dim() == 0 or leaf.shape[0] != batch_size for leaf in leaves):
        return None
    sizes = [leaf[0].numel() for leaf in leaves]
    m = sum(sizes)
    if m > MAX_EXACT_OUTPUTS:
        return None
    out_grads = torch.autograd.grad(split.losses.sum(), leaves, create_graph=True, allow_unused=True)
    pairs = [(o, leaf) for o, leaf in zip(out_grads, leaves) if o is not None and o.requires_grad]
    eye = torch.eye(m, dtype=leaves[0].dtype, device=leaves[0].device)
    basis = [block[:, None, :].expand(m, batch_size, -1).reshape(m, *leaf.shape)
             for block, leaf in zip(eye.split(sizes, dim=1), leaves)]
    if pairs:
        rows = torch.autograd.grad([o for o, _ in pairs], leaves, grad_outputs=[basis[leaves.index(leaf)]
                                   for _, leaf in pairs], is_grads_batched=True, allow_unused=True, retain_graph=True)
    else:
        rows = (None,) * len(leaves)
    hess = torch.cat([(r if r is not None else torch.zeros_like(b)).reshape(m, batch_size, -1)
                      for r, b in zip(rows, basis)], dim=2).permute(1, 0, 2)  # [B, M, M]
    w, q = torch.linalg.eigh(0.5 * (hess + hess.transpose(1, 2)))
    root = q * w.clamp_min(0).sqrt()[:, None, :]  # [B, M(out), M(col)]
    columns = root.permute(2, 0, 1)  # [col, B, M]
    return [piece.reshape(m, *leaf.shape) for piece, leaf in zip(columns.split(sizes, dim=2), leaves)]


def _captured(loss: FunctionalLoss, params: Params, batch: Batch,
              layers: list[_Layer]) -> list[tuple[_Layer, torch.Tensor, torch.Tensor]]:
    """``(layer, inputs [B, T, in], output gradients [C, B, T, out])`` per call of each factored layer."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    split_module(loss, leaves, batch)  # cached outside the recorder's hooks
    recorder = _Recorder(layers)
    try:
        split = split_forward(loss, leaves, batch)
    finally:
        recorder.remove()
    if not recorder.calls:
        return []
    size = batch_size_of(batch)
    cotangents = _cotangents(split, size)
    probes = [probe for _, _, probe in recorder.calls]
    if cotangents is None:  # empirical Fisher: the loss's own gradient, one column
        grads = torch.autograd.grad(split.losses.sum(), probes, allow_unused=True)
        grads = tuple(None if g is None else g[None] for g in grads)
    else:
        grads = torch.autograd.grad(split.outputs, probes, grad_outputs=cotangents, is_grads_batched=True,
                                    allow_unused=True)
    return [(layer, a, _output_gradients(layer, g.detach())) for (layer, a, _), g in zip(recorder.calls, grads)
            if g is not None]


def _accumulate_factors(calls: list[tuple[_Layer, torch.Tensor, torch.Tensor]]) -> None:
    for layer, a, g in calls:
        a64, g64 = a.double().reshape(-1, a.shape[-1]), g.double().reshape(-1, g.shape[-1])
        a_term, s_term = a64.T @ a64, g64.T @ g64
        layer.a_sum = a_term if layer.a_sum is None else layer.a_sum + a_term
        layer.s_sum = s_term if layer.s_sum is None else layer.s_sum + s_term
        layer.a_count += a64.shape[0]


def _accumulate_corrections(calls: list[tuple[_Layer, torch.Tensor, torch.Tensor]]) -> None:
    """Add ``sum_i sum_c (Q_S^T dW_ic Q_A)^2`` to each layer's corrected eigenvalues."""
    for layer, a, g in calls:
        assert layer.q_a is not None and layer.q_s is not None
        a_rot, g_rot = a @ layer.q_a.to(a), g @ layer.q_s.to(g)  # [B, T, in], [C, B, T, out]
        if a.shape[1] == 1:
            term = torch.einsum("cbo,bi->oi", g_rot[:, :, 0].square(), a_rot[:, 0].square())
        else:
            term = torch.zeros(g.shape[-1], a.shape[-1], dtype=a.dtype, device=a.device)
            for column in g_rot:  # per-example rotated gradients [B, out, in], one column at a time
                term += torch.bmm(column.transpose(1, 2), a_rot).square().sum(dim=0)
        term = term.double()
        layer.corrected = term if layer.corrected is None else layer.corrected + term


def _pack(layers: list[_Layer], attrs: Sequence[str], count: float) -> torch.Tensor:
    parts = [getattr(layer, attr).reshape(-1) for layer in layers for attr in attrs]
    counts = [torch.tensor([layer.a_count], dtype=torch.float64) for layer in layers] if "a_sum" in attrs else []
    return torch.cat([*(p.cpu() for p in parts), *counts, torch.tensor([count], dtype=torch.float64)])


def _unpack(flat: torch.Tensor, layers: list[_Layer], attrs: Sequence[str]) -> float:
    offset = 0
    for layer in layers:
        for attr in attrs:
            value = getattr(layer, attr)
            setattr(layer, attr, flat[offset : offset + value.numel()].reshape(value.shape).to(value.device))
            offset += value.numel()
    if "a_sum" in attrs:
        for layer in layers:
            layer.a_count = float(flat[offset])
            offset += 1
    return float(flat[offset])


def _init_sums(params: Params, layers: list[_Layer], attrs: Sequence[str]) -> None:
    """Zero sums of the right shapes (a rank without batches still takes part in the all-reduce)."""
    for layer in layers:
        w = params[layer.weight]
        out_f, in_f = w.shape[0], w[0].numel() + (1 if layer.bias is not None else 0)
        shapes = {"a_sum": (in_f, in_f), "s_sum": (out_f, out_f), "corrected": (out_f, in_f)}
        for attr in attrs:
            if getattr(layer, attr) is None:
                setattr(layer, attr, torch.zeros(shapes[attr], dtype=torch.float64, device=w.device))


def _diagonal(product: Optional[BatchProduct], params: Params, batches: list[Batch], layers: list[_Layer],
              offsets: dict[str, tuple[int, torch.Size]], total: int) -> torch.Tensor:
    """Hutchinson ``diag C`` (clamped at 0) on the parameters outside ``layers``, from the first batch."""
    first = next(iter(params.values()))
    diagonal = torch.zeros(total, dtype=first.dtype, device=first.device)
    covered = {n for layer in layers for n in (layer.weight, layer.bias) if n is not None}
    rest = [n for n in params if n not in covered]
    if not rest or product is None or not batches:
        return diagonal
    mask = torch.zeros(total, dtype=torch.bool, device=first.device)
    for name in rest:
        start, shape = offsets[name]
        mask[start : start + shape.numel()] = True
    generator = torch.Generator().manual_seed(0)
    probes = (torch.randint(0, 2, (DIAGONAL_PROBES, total), generator=generator) * 2 - 1).to(first)
    probes = probes * mask
    estimate = (probes * product(batches[0], probes)).mean(dim=0)
    return torch.where(mask, estimate.clamp_min(0), diagonal)


#: Most examples whose layer inputs and output-gradient columns one statistics pass holds at once: a batch is
#: taken in pieces of this size (the sums are the same). Each example holds M columns (its outputs) of every
#: layer's output gradients, in float64 while summed: the self-check's peak on ``benchmarks/scale.py``'s
#: 1.0M-parameter CNN (ten outputs, batches of 128) fell in this build.
FACTOR_PIECE = 32


def _pieces(batch: Batch) -> Iterator[Batch]:
    size = batch_size_of(batch)
    if size <= FACTOR_PIECE:
        yield batch
        return
    for start in range(0, size, FACTOR_PIECE):
        yield slice_batch(batch, start, min(start + FACTOR_PIECE, size))


def build_preconditioner(  # long: two data passes, each followed by its reduce, and the eigendecompositions
    kind: str, loss: FunctionalLoss, params: Params, batches: Iterable[Batch], *,
    product: Optional[BatchProduct] = None, reduce: Optional[Reduce] = None, shard: tuple[int, int] = (0, 1),
) -> KroneckerPreconditioner:
    """Build a K-FAC (``"kfac"``) or EK-FAC (``"ekfac"``) preconditioner from ``batches``.

    Args:
        kind: one of :data:`PRECONDITIONERS`.
        loss, params: the functional loss and the analysed parameters.
        batches: the training batches the statistics average over (prepared, on the model's device).
        product: ``(batch, V) -> C_b V`` for the diagonal of parameters outside Linear/Conv2d layers.
        reduce: sums a tensor over ranks (None: one process); called once per pass.
        shard: ``(rank, world_size)``: this rank uses batches ``rank, rank + world_size, ...``.
    """
    if kind not in PRECONDITIONERS:
        raise ValueError(f"Expected `preconditioner` to be one of {PRECONDITIONERS} or None, but got {kind!r}.")
    reduce = reduce or (lambda t: t)
    rank, world = shard
    mine = [b for i, b in enumerate(batches) if i % world == rank]
    layers = factored_layers(loss.model, params)
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = (start, p.shape)
        start += p.numel()
    examples = 0
    for batch in mine:
        for piece in _pieces(batch):
            _accumulate_factors(_captured(loss, params, piece, layers))
        examples += batch_size_of(batch)
    _init_sums(params, layers, ("a_sum", "s_sum"))
    examples = int(round(_unpack(reduce(_pack(layers, ("a_sum", "s_sum"), examples)), layers, ("a_sum", "s_sum"))))
    if examples == 0:
        raise ValueError("Expected training examples to build the preconditioner from, but got none.")
    dtype = next(iter(params.values())).dtype
    for layer in layers:
        assert layer.a_sum is not None and layer.s_sum is not None
        l_a, q_a = torch.linalg.eigh(layer.a_sum / max(layer.a_count, 1.0))
        l_s, q_s = torch.linalg.eigh(layer.s_sum / examples)
        layer.q_a, layer.q_s = q_a.to(dtype), q_s.to(dtype)
        layer.eigenvalues = (l_s.clamp_min(0)[:, None] * l_a.clamp_min(0)[None, :]).to(dtype)
        layer.a_sum = layer.s_sum = None
    if kind == "ekfac" and layers:
        for batch in mine:
            for piece in _pieces(batch):
                _accumulate_corrections(_captured(loss, params, piece, layers))
        _init_sums(params, layers, ("corrected",))
        _unpack(reduce(_pack(layers, ("corrected",), 0.0)), layers, ("corrected",))
        for layer in layers:
            assert layer.corrected is not None
            layer.eigenvalues = (layer.corrected / examples).to(dtype)
            layer.corrected = None
    diagonal = _diagonal(product, params, mine, layers, offsets, start)
    covered = {n for layer in layers for n in (layer.weight, layer.bias) if n is not None}
    if set(params) - covered:  # the same on every rank: all reduce or none does
        diagonal = reduce(diagonal) / world
    return KroneckerPreconditioner(kind, layers, diagonal, offsets)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[Any, KroneckerPreconditioner]]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (storage and version counter)."""
    return tuple((name, p.data_ptr(), p._version) for name, p in model.named_parameters())


def cached_preconditioner(model: nn.Module, key: Any, build: Callable[[], KroneckerPreconditioner]
                          ) -> KroneckerPreconditioner:
    """``build()`` once per ``(key, weights)`` of ``model``: reused while its weights do not change."""
    entries = _CACHE.setdefault(model, {})
    full_key = (key, weights_fingerprint(model))
    if full_key not in entries:
        entries.clear()  # the weights moved on: older factors are stale
        entries[full_key] = build()
    return entries[full_key]
