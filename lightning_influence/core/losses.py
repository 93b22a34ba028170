"""The user's per-example loss as a pure function of the parameters.

``loss_fn(model, batch) -> Tensor[B]`` is the only thing the user provides. :class:`FunctionalLoss` calls it
through :func:`torch.func.functional_call`, so gradients, Hessian-vector products and Jacobian-vector
products can be taken with respect to a parameter dictionary without touching ``.grad`` or the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_influence.core.batching import Batch, add_batch_dim, batch_size_of, batched_in_dims
from lightning_influence.core.params import Params, flatten

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
    """``(params, batch) -> per-example losses [B]`` for a model and a user loss function."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        if not callable(loss_fn):
            raise TypeError(f"Expected `loss_fn` to be a callable (model, batch) -> Tensor[B], but got {loss_fn!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self._module = _LossModule(model, loss_fn)

    def __call__(self, params: Params, batch: Batch) -> torch.Tensor:
        losses = functional_call(self._module, {_PREFIX + k: v for k, v in params.items()}, (batch,))
        return check_per_example_losses(losses, batch_size_of(batch))

    def mean(self, params: Params, batch: Batch) -> torch.Tensor:
        return self(params, batch).mean()

    def per_example_grads(self, params: Params, batch: Batch, check: bool = True) -> torch.Tensor:
        """``[B, P]`` matrix of per-example gradients ``grad L(z_i)`` (``vmap`` over ``grad``)."""
        return flatten(self.per_example_grad_dict(params, batch, check), batch_dims=1)

    def per_example_grad_dict(self, params: Params, batch: Batch, check: bool = True) -> Params:
        """Per-example gradients as ``{name: [B, *shape]}`` (no flat copy).

        ``check`` first runs the loss on the whole batch to validate its shape (which ``vmap`` would hide)
        and that every loss is finite.
        """
        if check:
            with torch.no_grad():
                losses = self(params, batch)
            if not bool(torch.isfinite(losses).all()):
                rows = (~torch.isfinite(losses)).nonzero().flatten()[:10].tolist()
                raise ValueError(
                    f"Expected finite per-example losses, but batch rows {rows} have loss {losses[rows].tolist()}."
                    " Influence needs finite losses and gradients: check those examples (NaN inputs, labels out of"
                    " range) and the model's weights."
                )

        def single(p: Params, example: Batch) -> torch.Tensor:
            return self(p, add_batch_dim(example))[0]

        return vmap(grad(single), in_dims=(None, batched_in_dims(batch)))(params, batch)


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


def check_finite_losses(losses: Any, indices: torch.Tensor, split: str) -> torch.Tensor:
    """Per-example losses of the right shape and all finite; else an error naming the dataset indices."""
    losses = check_per_example_losses(losses, len(indices))
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        where = indices[bad.cpu()][:10].tolist()
        raise ValueError(
            f"Expected finite per-example losses, but the {split} examples {where} have loss"
            f" {losses.detach()[bad][:10].tolist()}. Influence needs finite losses and gradients: check those examples"
            " (NaN inputs, labels out of range) and the model (diverged weights), e.g. `torch.isfinite(loss)`."
        )
    return losses
