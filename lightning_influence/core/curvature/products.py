"""Gauss-Newton products of the mean training loss, and the output split they need.

The Gauss-Newton product ``G V = (1/B) sum_i J_i^T H_out,i J_i V`` needs the loss split into the model's
outputs ``f(theta)`` and a loss of those outputs ``l(f)``. One forward pass gives both: a forward hook on the
model replaces its output by detached stand-ins that require grad, so ``f`` is a graph from the parameters
to the outputs and ``l`` a graph from the stand-ins to the losses. Only reverse-mode autograd is used
(models that cannot be ``vmap``-ed, such as Hugging Face ones, still work):

* ``J V``: the double-vjp trick, ``d/du <J^T u, V>`` with a dummy cotangent ``u``;
* ``H_out W``: double backward of the mean loss with respect to the stand-ins;
* ``J^T W``: one vjp.

The k vectors ``V [k, P]`` go through each step at once (``is_grads_batched``). When ``loss_fn`` does not call
the model exactly once, pass :class:`SplitLoss` (outputs function + loss of outputs) instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from lightning_influence.core.per_example.losses import FunctionalLoss, autocast_off, check_per_example_losses
from lightning_influence.core.tensors.batching import Batch, batch_size_of, slice_batch
from lightning_influence.core.tensors.memory import PER_EXAMPLE_BYTES, free_memory_bytes
from lightning_influence.core.tensors.params import Params, flatten, unflatten

BatchProduct = Callable[[Batch, torch.Tensor], torch.Tensor]

_PREFIX = "model."


class SplitLoss:
    """A per-example loss given in two parts, for models the output capture cannot handle.

    ``SplitLoss(outputs_fn, loss_of_outputs)`` is itself a ``loss_fn(model, batch) -> Tensor[B]`` (it returns
    ``loss_of_outputs(outputs_fn(model, batch), batch)``), so it can be passed wherever a loss function goes;
    the Gauss-Newton product then takes ``outputs_fn``'s result as the outputs.

    Args:
        outputs_fn: ``(model, batch) -> outputs``: a tensor or a nested dict/tuple/dataclass of tensors.
        loss_of_outputs: ``(outputs, batch) -> Tensor[B]``: per-example losses that depend on the parameters
            only through ``outputs``.

    Example:
        >>> import torch.nn.functional as F
        >>> loss_fn = SplitLoss(lambda m, b: m.head(m.body(b[0])),
        ...                     lambda out, b: F.cross_entropy(out, b[1], reduction="none"))
    """

    def __init__(self, outputs_fn: Callable[[nn.Module, Batch], Any],
                 loss_of_outputs: Callable[[Any, Batch], torch.Tensor]) -> None:
        if not callable(outputs_fn) or not callable(loss_of_outputs):
            raise TypeError("Expected `outputs_fn` and `loss_of_outputs` to be callables.")
        self.outputs_fn = outputs_fn
        self.loss_of_outputs = loss_of_outputs

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_of_outputs(self.outputs_fn(model, batch), batch)


def twice_differentiable() -> Any:
    """Attention by the math kernel: the fused CPU/GPU kernels have no double backward, which both products need."""
    return sdpa_kernel([SDPBackend.MATH])


class OutputCaptureError(ValueError):
    """The model's outputs could not be separated from the loss for the Gauss-Newton product."""


def map_floating(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every floating tensor in it (dicts incl. ``ModelOutput``, tuples,
    namedtuples, lists and dataclasses are rebuilt; anything else is kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() or obj.is_complex() else obj
    if isinstance(obj, dict):
        out = obj.copy() if hasattr(obj, "copy") else dict(obj)
        for key in list(obj.keys()):
            out[key] = map_floating(obj[key], fn)
        if dataclasses.is_dataclass(obj):  # e.g. transformers' ModelOutput: keep attributes in step
            for key in obj:
                object.__setattr__(out, key, out[key])
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_floating(x, fn) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_floating(x, fn) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_floating(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


class _Substitute:
    """Called with the model's output: records the tensors and returns detached stand-ins requiring grad."""

    def __init__(self) -> None:
        self.calls = 0
        self.outputs: list[torch.Tensor] = []
        self.leaves: list[torch.Tensor] = []

    def __call__(self, output: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            return output

        def swap(tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.requires_grad:  # does not depend on the parameters
                return tensor
            leaf = tensor.detach().requires_grad_(True)
            self.outputs.append(tensor)
            self.leaves.append(leaf)
            return leaf

        return map_floating(output, swap)


class _SplitModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: SplitLoss, substitute: _Substitute) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.substitute = substitute

    def forward(self, batch: Batch) -> torch.Tensor:
        outputs = self.loss_fn.outputs_fn(self.model, batch)
        return self.loss_fn.loss_of_outputs(self.substitute(outputs), batch)


_HOW_TO_FIX = (
    " Write `loss_fn` so that it calls `model(...)` exactly once and computes the per-example loss from that"
    " output, or pass `loss_fn=SplitLoss(outputs_fn, loss_of_outputs)` (lightning_influence.core.curvature.products) with"
    " `outputs_fn(model, batch) -> outputs` and `loss_of_outputs(outputs, batch) -> Tensor[B]`."
    " (curvature='hessian' needs no split, but its solves diverge on nets with negative curvature.)"
)


@dataclasses.dataclass
class SplitForward:
    """One forward pass split at the model's outputs."""

    outputs: list[torch.Tensor]  # depend on the parameters
    leaves: list[torch.Tensor]  # their detached stand-ins
    losses: torch.Tensor  # [B], a function of ``leaves`` only


def split_module(loss: FunctionalLoss, params: Params, batch: Batch) -> nn.Module:
    """The module whose output splits network and loss: the model itself when ``loss_fn`` calls it; else (a
    LightningModule's ``per_example_loss`` calling ``self.net(x)``, say) the last module with trainable parameters
    that ``loss_fn`` calls at the top level (not from inside another module). Found by one forward, then cached."""
    cached = getattr(loss, "_split_module", None)
    if cached is not None:
        return cached
    owned = {id(m) for m in loss.model.modules()}
    holders = {id(m) for m in loss.model.modules() if any(p.requires_grad for p in m.parameters())}
    depth, calls = [0], []

    def before(module: nn.Module, args: Any) -> None:
        if id(module) in owned:
            if depth[0] == 0 and id(module) in holders:
                calls.append(module)
            depth[0] += 1

    def after(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in owned:
            depth[0] -= 1

    hooks = (register_module_forward_pre_hook(before), register_module_forward_hook(after))
    try:
        with torch.no_grad():
            loss(params, batch)
    finally:
        for hook in hooks:
            hook.remove()
    target = loss.model if not calls or any(m is loss.model for m in calls) else calls[-1]
    loss._split_module = target  # type: ignore[attr-defined]
    return target


def split_forward(loss: FunctionalLoss, params: Params, batch: Batch) -> SplitForward:
    """Run ``loss_fn`` once with ``params``, capturing the model's outputs (see the module docstring)."""
    substitute = _Substitute()
    prefixed, batch = loss.functional_args(params, batch)
    if isinstance(loss.loss_fn, SplitLoss):
        with twice_differentiable(), autocast_off(params):
            losses = functional_call(_SplitModule(loss.model, loss.loss_fn, substitute), prefixed, (batch,))
        what = "`SplitLoss.outputs_fn`"
    else:
        target = split_module(loss, params, batch)
        handle = target.register_forward_hook(lambda module, args, output: substitute(output))
        try:
            with twice_differentiable(), autocast_off(params):
                losses = functional_call(loss._module, prefixed, (batch,))
        finally:
            handle.remove()
        what = f"the model ({type(target).__name__}.forward)"
        if substitute.calls != 1:
            raise OutputCaptureError(
                f"Expected `loss_fn` to call the model exactly once per batch for curvature='gauss_newton' (its"
                f" output is where the loss is split from the network), but it was called {substitute.calls}"
                f" time(s).{_HOW_TO_FIX}"
            )
    if not substitute.leaves:
        raise OutputCaptureError(
            f"Expected {what} to return floating tensors that depend on the trainable parameters, but none of its"
            f" outputs does.{_HOW_TO_FIX}"
        )
    losses = check_per_example_losses(losses, batch_size_of(batch))
    direct = torch.autograd.grad(losses.sum(), list(params.values()), retain_graph=True, allow_unused=True)
    if any(g is not None for g in direct):
        raise OutputCaptureError(
            "Expected the per-example loss to depend on the parameters only through the model's output, but"
            " `loss_fn` also uses parameters directly (e.g. an L2 term or a second model call through a"
            " submodule). Leave the L2 term out (pass the weight decay instead)." + _HOW_TO_FIX
        )
    return SplitForward(substitute.outputs, substitute.leaves, losses)


def _grad(outputs: Sequence[torch.Tensor | None], inputs: list[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None], *,
          create_graph: bool = False, retain_graph: bool = True, batched: bool = True) -> list[torch.Tensor | None]:
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad(
        [o for o, _ in pairs], inputs, grad_outputs=[g for _, g in pairs], create_graph=create_graph,
        retain_graph=retain_graph, allow_unused=True, is_grads_batched=batched,
    ))


def _zeros(like: torch.Tensor, k: int, batched: bool) -> torch.Tensor:
    return torch.zeros(k, *like.shape, dtype=like.dtype, device=like.device) if batched else torch.zeros_like(like)


def _zeros_for_none(values: list[torch.Tensor | None], like: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    return [v if v is not None else torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device)
            for v, p in zip(values, like)]


def batch_ggn(loss: FunctionalLoss, params: Params, batch: Batch, vectors: torch.Tensor,
              batched: bool = True) -> torch.Tensor:
    """``G_b V`` for the Gauss-Newton matrix ``G_b`` of the mean loss over ``batch`` and ``V`` of shape ``[k, P]``.

    ``batched=True`` pushes the k vectors through each backward at once; ``False`` loops over them.
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    inputs = list(leaves.values())
    split = split_forward(loss, leaves, batch)
    dummies = [torch.zeros_like(o, requires_grad=True) for o in split.outputs]
    jt_u = torch.autograd.grad(split.outputs, inputs, grad_outputs=dummies, create_graph=True, allow_unused=True)
    out_grads = torch.autograd.grad(split.losses.mean(), split.leaves, create_graph=True, allow_unused=True)
    out = torch.empty(vectors.shape, dtype=vectors.dtype, device=vectors.device)
    if not batched:  # each row written into ``out`` in place: no per-row [1, P] tensors concatenated afterwards
        for row, v in zip(out, vectors):
            _ggn_rows(split, inputs, dummies, list(jt_u), list(out_grads), v[None], leaves, row[None], batched=False)
        return out
    return _ggn_rows(split, inputs, dummies, list(jt_u), list(out_grads), vectors, leaves, out, batched=True)


def _ggn_rows(split: SplitForward, inputs: list[torch.Tensor], dummies: list[torch.Tensor],
              jt_u: list[torch.Tensor | None], out_grads: list[torch.Tensor | None], vectors: torch.Tensor,
              like: Params, out: torch.Tensor, batched: bool) -> torch.Tensor:
    """``G V`` into ``out`` ``[k, P]`` (returned), parameter by parameter."""
    k = vectors.shape[0]
    pieces = list(unflatten(vectors, like).values())
    if not batched:
        pieces = [p[0] for p in pieces]
    jv = _grad(jt_u, dummies, pieces, batched=batched)  # J V, per output
    jv = [j if j is not None else _zeros(d, k, batched) for j, d in zip(jv, dummies)]
    hjv = _grad(out_grads, split.leaves, jv, batched=batched)  # H_out J V, per output
    hjv = [h if h is not None else _zeros(d, k, batched) for h, d in zip(hjv, dummies)]
    jthjv = _grad(split.outputs, inputs, hjv, batched=batched)  # J^T H_out J V, per parameter
    offset = 0
    for value, parameter in zip(jthjv, inputs):
        target = out[:, offset : offset + parameter.numel()]  # a view of out's columns
        offset += parameter.numel()
        if value is None:
            target.zero_()
        else:
            target.copy_(value.detach().reshape(k, -1))
    return out


#: The batched-or-looped timing of :class:`GaussNewtonProduct` runs on at most this many examples of the first batch:
#: the batched form holds every vector's activations at once (on the 1.0M-parameter CNN of ``benchmarks/scale.py``
#: about 250 MiB for 8 vectors on 128 examples, the analysis's peak), so it is tried only where that is small.
PRODUCT_PROBE_EXAMPLES = 16
#: The batched form also holds about this many ``[k, P]`` copies of the vectors at once, whatever the batch
#: (measured on that CNN: 531 MiB above the state for 32 vectors on 16 examples, 4.1 copies of 128 MiB).
BATCHED_COPIES = 4


def batched_fits(k: int, num_params: int, element_size: int, device: torch.device | str) -> bool:
    """Whether the batched form's ``BATCHED_COPIES`` copies of ``k x num_params`` numbers fit the per-example budget
    (:data:`~lightning_influence.core.tensors.memory.PER_EXAMPLE_BYTES`, lowered to a sixteenth of the free
    memory): past it only the looped form runs, one vector at a time (on the CNN above, 8 vectors need 128 MiB)."""
    budget = min(PER_EXAMPLE_BYTES, free_memory_bytes(device) // 16)
    return BATCHED_COPIES * k * num_params * element_size <= budget


class GaussNewtonProduct:
    """``(batch, V) -> G_b V``; on its first call with several vectors it times the batched and the looped
    form once, on the first :data:`PRODUCT_PROBE_EXAMPLES` examples of the batch, and keeps the faster (measured
    on CPU: batched 3x faster on an MLP at k=16, looped 1.2-1.8x faster on a CNN and a transformer), where the
    batched form fits the memory budget (:func:`batched_fits`; else looped, decided per call: another k may fit).
    ``batched`` forces one."""

    def __init__(self, loss: FunctionalLoss, params: Params, batched: bool | None = None) -> None:
        self.loss, self.params, self.batched = loss, params, batched

    def __call__(self, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
        if self.batched is None and vectors.shape[0] > 1:
            if not batched_fits(vectors.shape[0], vectors.shape[1], vectors.element_size(), vectors.device):
                return batch_ggn(self.loss, self.params, batch, vectors, False)  # too large to try: looped
            size = batch_size_of(batch)
            probe = batch if size <= PRODUCT_PROBE_EXAMPLES else slice_batch(batch, 0, PRODUCT_PROBE_EXAMPLES)
            timings = {}
            for batched in (False, True):
                start = time.perf_counter()
                result = batch_ggn(self.loss, self.params, probe, vectors, batched)
                timings[batched] = time.perf_counter() - start
            self.batched = timings[True] <= timings[False]
            if probe is batch:
                return result
            del result
        return batch_ggn(self.loss, self.params, batch, vectors, bool(self.batched) and vectors.shape[0] > 1)


def dataset_product(product: BatchProduct, batches: Iterable[Batch], vectors: torch.Tensor) -> torch.Tensor:
    """``C V`` for the curvature of the mean loss over all examples of ``batches`` (weighted by batch size)."""
    total = torch.zeros_like(vectors)
    count = 0
    for batch in batches:
        size = batch_size_of(batch)
        total.add_(product(batch, vectors), alpha=size)
        count += size
    if count == 0:
        raise ValueError("Expected the training data to hold at least one example, but it is empty.")
    return total.div_(count)


def batch_ggn_matrix(loss: FunctionalLoss, params: Params, batch: Batch) -> torch.Tensor:
    """The dense ``G_b = J^T H_out J`` of the mean loss over ``batch``: ``J`` by one batched vjp with the identity
    over the M outputs, ``H_out`` by one batched double backward (``[M, P]`` and ``[M, M]`` in memory)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    inputs = list(leaves.values())
    split = split_forward(loss, leaves, batch)
    sizes = [o.numel() for o in split.outputs]
    eye = torch.eye(sum(sizes), dtype=split.outputs[0].dtype, device=split.outputs[0].device)
    pieces = [block.reshape(-1, *o.shape) for block, o in zip(eye.split(sizes, dim=1), split.outputs)]
    jacobian = flatten(_zeros_for_none(_grad(split.outputs, inputs, pieces), inputs, len(eye)), batch_dims=1)
    out_grads = list(torch.autograd.grad(split.losses.mean(), split.leaves, create_graph=True, allow_unused=True))
    h_rows = _grad(out_grads, split.leaves, pieces, retain_graph=False)
    h_out = flatten([h if h is not None else torch.zeros_like(p) for h, p in zip(h_rows, pieces)], batch_dims=1)
    return (jacobian.T @ h_out @ jacobian).detach()


def ggn_matrix(loss: FunctionalLoss, params: Params, batches: Iterable[Batch],
               examples_per_block: int = 32) -> torch.Tensor:
    """The dense ``[P, P]`` Gauss-Newton matrix of the mean training loss (small models only: the exact reference),
    summed from :func:`batch_ggn_matrix` over blocks of ``examples_per_block`` examples."""
    size = sum(p.numel() for p in params.values())
    first = next(iter(params.values()))
    total = torch.zeros(size, size, dtype=first.dtype, device=first.device)
    count = 0
    for batch in batches:
        n = batch_size_of(batch)
        for start in range(0, n, examples_per_block):
            block = slice_batch(batch, start, min(start + examples_per_block, n))
            m = batch_size_of(block)
            total += m * batch_ggn_matrix(loss, params, block)
            count += m
    if count == 0:
        raise ValueError("Expected the training data to hold at least one example, but it is empty.")
    total /= count
    return 0.5 * (total + total.T)
