"""Batches as nested tuples/lists/dicts of tensors: device moves, sizes, slicing, and what they hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

Batch = Any

#: Dict-batch keys read as the model input and as the labels (first match wins).
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "features")
LABEL_KEYS = ("label", "labels", "y", "target", "targets")
#: Channel counts and the smallest side of an input drawn as an image.
IMAGE_CHANNELS = (1, 3, 4)
MIN_IMAGE_SIDE = 4
#: Non-image inputs up to this many values are kept on the result records (tabular rows, token ids) for rendering.
MAX_KEPT_INPUT_VALUES = 4096
#: The longest side of the small copy of an image kept on mislabel candidates past the first ones (:func:`thumbnail`).
THUMBNAIL_SIDE = 32


def prepare_batch(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of ``batch`` to ``device``.

    Tensors created under ``torch.inference_mode`` (e.g. cached in a validation hook) cannot take part in
    autograd, so they are cloned into normal tensors.
    """

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if leaf.is_inference():
            with torch.inference_mode(False):
                leaf = leaf.clone()
        return leaf.to(device)

    return tree_map(move, batch)


def batch_size_of(batch: Batch) -> int:
    """Number of examples in ``batch``: the first dimension of its first tensor."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError(
        f"Expected a batch holding at least one tensor with a batch dimension, but got {type(batch).__name__}."
        " Batches may be tensors, or tuples, lists and dicts of tensors."
    )


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of every batched tensor in ``batch``."""
    return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def add_batch_dim(example: Batch) -> Batch:
    """Turn a single example (as seen inside ``vmap``) back into a batch of one."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)


def batched_in_dims(batch: Batch) -> Any:
    """``vmap`` in_dims for ``batch``: 0 for batched tensors, None for everything else."""
    return tree_map(lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 else None, batch)


def model_input(batch: Batch) -> Optional[torch.Tensor]:
    """The model input of a batch: the batch itself, the first item of a tuple, or a dict's input key."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        return next((batch[k] for k in INPUT_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
    return None


@dataclass(frozen=True)
class Description:
    """What the tables and grids show for a batch: inputs, labels and model predictions (any may be None), and
    ``texts``: one string per example from an ``example_formatter`` (token ids decoded, a tabular row), if given."""

    inputs: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    predictions: Optional[torch.Tensor]
    texts: Optional[list[str]] = None


ExampleFormatter = Callable[[Any], str]


def describe_batch(model: nn.Module, batch: Batch, example_formatter: Optional[ExampleFormatter] = None) -> Description:
    """Inputs/labels from ``(input, target, ...)`` tuples or dicts with usual key names; predictions by argmax.

    ``example_formatter(example) -> str`` is called on each example of the batch (the batch's structure with every
    batched tensor indexed by the row, e.g. ``{"input_ids": Tensor[T], ...}``), e.g. a tokenizer's ``decode``.
    Bind it with ``functools.partial(describe_batch, example_formatter=...)`` to get a ``Describe``.
    """
    inputs = labels = None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        inputs = batch[0]
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    elif isinstance(batch, dict):
        inputs = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    predictions = None
    if isinstance(batch, dict):
        predictions = _dict_batch_predictions(model, batch)
    elif isinstance(inputs, torch.Tensor):
        with torch.no_grad():
            predictions = _predictions(model(inputs))
    texts = None
    if example_formatter is not None:
        texts = [str(example_formatter(tree_map(lambda t, i=i: t[i] if isinstance(t, torch.Tensor) and t.dim() > 0
                                                else t, batch))) for i in range(batch_size_of(batch))]
    return Description(inputs, labels, predictions, texts)


def _predictions(out: Any) -> Optional[torch.Tensor]:
    """Argmax of ``[B, C]`` logits (``out`` or its ``.logits``, as Hugging Face outputs carry them), the value of a
    ``[B, 1]`` output; None for anything else."""
    out = getattr(out, "logits", out)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return out.argmax(dim=1) if out.shape[1] > 1 else out[:, 0]
    return None


def _dict_batch_predictions(model: nn.Module, batch: dict[str, Any]) -> Optional[torch.Tensor]:
    """Predictions for a dict batch: ``model(batch)`` (a LightningModule whose ``forward`` takes the batch),
    else ``model(**batch)`` (a Hugging Face model), else ``model(batch[input key])``. A prediction is only
    shown beside the scores, so a model that takes none of these forms gets none instead of an error."""
    inputs = next((batch[k] for k in INPUT_KEYS if k in batch), None)
    calls: list[Callable[[], Any]] = [lambda: model(batch), lambda: model(**batch)]
    if isinstance(inputs, torch.Tensor):
        calls.append(lambda: model(inputs))
    for call in calls:
        try:
            with torch.no_grad():
                predictions = _predictions(call())
        except Exception:  # noqa: BLE001 - try the next calling convention
            continue
        if predictions is not None and predictions.shape[0] == batch_size_of(batch):
            return predictions
    return None


def looks_like_image(x: torch.Tensor) -> bool:
    """Whether ``x`` is one example that can be drawn as an image.

    Args:
        x: a single example's input (no batch dimension).

    Returns:
        True for ``[C, H, W]`` with ``C`` in (1, 3, 4) or for ``[H, W]``, with ``H, W >= 4``; False for
        anything else (flat feature vectors, token ids, batches, non-tensors).

    Example:
        >>> looks_like_image(torch.zeros(1, 28, 28)), looks_like_image(torch.zeros(784))
        (True, False)
    """
    if not isinstance(x, torch.Tensor) or x.is_complex():
        return False
    if x.ndim == 3 and x.shape[0] not in IMAGE_CHANNELS:
        return False
    if x.ndim not in (2, 3):
        return False
    return min(x.shape[-2:]) >= MIN_IMAGE_SIDE


def row_value(values: Optional[torch.Tensor], row: int) -> Any:
    """Row ``row`` of ``values`` as a Python value (``.item()`` / ``.tolist()``), None without values."""
    if values is None:
        return None
    value = values[row]
    return value.item() if value.numel() == 1 else value.tolist()


def keeps_input(x: Any) -> bool:
    """Whether an example's input is kept on the result records: images, and other tensors of at most
    ``MAX_KEPT_INPUT_VALUES`` values (tabular rows, token ids); large non-image inputs are dropped."""
    if not isinstance(x, torch.Tensor) or x.is_complex():
        return False
    return looks_like_image(x) or x.numel() <= MAX_KEPT_INPUT_VALUES


def thumbnail(x: Any, side: int = THUMBNAIL_SIDE) -> Optional[torch.Tensor]:
    """A small copy of one example's input, kept where the full input would cost too much memory.

    Images (:func:`looks_like_image`) are average-pooled to at most ``side`` pixels a side (not below
    ``MIN_IMAGE_SIDE``) and min-max scaled to uint8 (as the rendered thumbnails are); other inputs that
    :func:`keeps_input` keeps are returned detached on the CPU; anything else gives None.

    Example:
        >>> thumbnail(torch.rand(3, 128, 64)).shape, thumbnail(torch.rand(3, 128, 64)).dtype
        (torch.Size([3, 32, 16]), torch.uint8)
    """
    if not keeps_input(x):
        return None
    x = x.detach().cpu()
    if not looks_like_image(x):
        return x.clone()
    image = torch.nan_to_num(x.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    image = image.unsqueeze(0) if image.ndim == 2 else image
    height, width = image.shape[-2:]
    factor = max(height, width) / side
    if factor > 1:
        size = (max(MIN_IMAGE_SIDE, round(height / factor)), max(MIN_IMAGE_SIDE, round(width / factor)))
        image = torch.nn.functional.adaptive_avg_pool2d(image.unsqueeze(0), size)[0]
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    pixels = (image * 255).round().to(torch.uint8)
    return pixels[0] if x.ndim == 2 else pixels
