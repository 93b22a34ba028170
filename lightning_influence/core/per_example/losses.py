"""The user's per-example loss as a pure function of the parameters.

``loss_fn(model, batch) -> Tensor[B]`` is the only thing the user provides. :class:`FunctionalLoss` calls it
through :func:`torch.func.functional_call`, so gradients, Hessian-vector products and Jacobian-vector
products can be taken with respect to a parameter dictionary without touching ``.grad`` or the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from lightning_influence.core.tensors.batching import Batch, add_batch_dim, batch_size_of, batched_in_dims
from lightning_influence.core.tensors.params import Params, analysis_dtype, flatten

LossFn = Callable[[nn.Module, Any], torch.Tensor]

_PREFIX = "model."


class _LossModule(nn.Module):
    """Wraps ``model`` so that ``loss_fn(model, batch)`` becomes a module forward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class FunctionalLoss:
    """``(params, batch) -> per-example losses [B]`` for a model and a user loss function.

    The analysis runs in ``dtype`` (default: float32, or float64 for a float64 model; see
    :func:`~lightning_influence.core.tensors.params.analysis_dtype`) whatever the training precision: floating parameters
    and buffers in another dtype (bf16/fp16 weights, frozen ones included) are used through float copies, floating
    batch tensors are cast too, and autocast is off during every call.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, dtype: Optional[torch.dtype] = None) -> None:
        if not callable(loss_fn):
            raise TypeError(f"Expected `loss_fn` to be a callable (model, batch) -> Tensor[B], but got {loss_fn!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self._module = _LossModule(model, loss_fn)
        self.dtype = analysis_dtype(model, dtype)
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        #: Float copies of every floating parameter/buffer not already in the analysis dtype (empty when none).
        self.cast = {
            _PREFIX + name: t.detach().to(self.dtype)
            for name, t in tensors
            if t.is_floating_point() and t.dtype != self.dtype
        }

    def __call__(self, params: Params, batch: Batch) -> torch.Tensor:
        state, batch = self.functional_args(params, batch)
        with autocast_off(params):
            losses = functional_call(self._module, state, (batch,))
        return check_per_example_losses(losses, batch_size_of(batch))

    def functional_args(self, params: Params, batch: Batch) -> tuple[dict[str, torch.Tensor], Batch]:
        """The state for ``functional_call`` of the loss module (``params`` and the upcast buffers) and the batch
        with its floating tensors in the analysis dtype."""
        if self.cast:
            batch = tree_map(lambda t: t.to(self.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                             batch)
        return {**self.cast, **{_PREFIX + k: v for k, v in params.items()}}, batch

    def mean(self, params: Params, batch: Batch) -> torch.Tensor:
        return self(params, batch).mean()

    def per_example_grads(self, params: Params, batch: Batch, check: bool = True) -> torch.Tensor:
        """``[B, P]`` matrix of per-example gradients ``grad L(z_i)`` (``vmap`` over ``grad``; module hooks when
        ``vmap`` cannot trace the model)."""
        return flatten(self.per_example_grad_dict(params, batch, check), batch_dims=1)

    def per_example_grad_dict(self, params: Params, batch: Batch, check: bool = True) -> Params:
        """Per-example gradients as ``{name: [B, *shape]}`` (no flat copy).

        ``check`` first runs the loss on the whole batch to validate its shape (which ``vmap`` would hide)
        and that every loss is finite.
        """
        if check:
            with torch.no_grad():
                check_finite_losses(self(params, batch))

        def single(p: Params, example: Batch) -> torch.Tensor:
            return self(p, add_batch_dim(example))[0]

        try:
            return vmap(grad(single), in_dims=(None, batched_in_dims(batch)))(params, batch)
        except (RuntimeError, NotImplementedError) as err:  # vmap cannot trace it (.item(), data-dependent code)
            if "out of memory" in str(err).lower():
                raise
            from lightning_influence.core.per_example.engine import PerExampleEngine

            return PerExampleEngine(self, params).grad_dict(batch)


@contextlib.contextmanager
def autocast_off(params: Params) -> Iterator[None]:
    """Disable autocast (a bf16/fp16-mixed training context) on the device the parameters live on."""
    device = next(iter(params.values())).device.type if params else "cpu"
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        with torch.autocast(device_type=device, enabled=False):
            yield
    else:
        yield


def check_per_example_losses(losses: Any, batch_size: int) -> torch.Tensor:
    """Validate that ``loss_fn`` returned one finite-shaped loss per example."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(
            f"Expected `loss_fn` to return a Tensor of per-example losses with shape [{batch_size}], but got"
            f" {type(losses).__name__}."
        )
    if losses.dim() == 2 and losses.shape[1] == 1:
        losses = losses[:, 0]
    if losses.dim() != 1 or losses.shape[0] != batch_size:
        hint = (
            " It looks like a reduced (mean/sum) loss: compute it with `reduction='none'`, e.g."
            " `F.cross_entropy(logits, y, reduction='none')`."
            if losses.dim() == 0
            else ""
        )
        raise ValueError(
            f"Expected `loss_fn` to return per-example losses of shape [{batch_size}] (one per example in the"
            f" batch), but got shape {list(losses.shape)}.{hint}"
        )
    return losses


def call_loss_fn(loss_fn: LossFn, model: nn.Module, batch: Batch) -> Any:
    """``loss_fn(model, batch)``; a failure to read the batch says what the batch looks like and what to do."""
    try:
        return loss_fn(model, batch)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise TypeError(
            f"`loss_fn` failed on a batch of the data ({_batch_structure(batch)}) with"
            f" {type(err).__name__}: {err}. The loss function must accept the batches your DataLoader yields: pass"
            " `loss_fn=lambda module, batch: ...` (or define `per_example_loss(batch)`) that unpacks them, returning"
            " one loss per example."
        ) from err


def _batch_structure(batch: Batch) -> str:
    if isinstance(batch, dict):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    if isinstance(batch, torch.Tensor):
        return f"a Tensor of shape {list(batch.shape)}"
    return f"a {type(batch).__name__}"


def check_finite_losses(losses: Any, indices: Optional[torch.Tensor] = None, split: str = "batch") -> torch.Tensor:
    """Per-example losses, all finite; else an error naming the examples: dataset ``indices`` (of the ``split``)
    when given, else the batch rows. With ``indices`` the shape is checked first."""
    if indices is not None:
        losses = check_per_example_losses(losses, len(indices))
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        where = (indices[bad.cpu()] if indices is not None else bad.nonzero().flatten())[:10].tolist()
        what = f"the {split} examples" if indices is not None else "batch rows"
        raise ValueError(
            f"Expected finite per-example losses, but {what} {where} have loss {losses.detach()[bad][:10].tolist()}."
            " Influence needs finite losses and gradients: check those examples (NaN inputs, labels out of range)"
            " and the model (diverged weights), e.g. `torch.isfinite(loss)`."
        )
    return losses
