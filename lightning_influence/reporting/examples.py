"""Small renderings of the reported examples, for the Influence dashboard: the reports' ``examples`` object.

The report JSON lists training examples as ``[train_index, influence]`` pairs only. Its ``examples`` object
carries what a viewer shows for each example that appears in the report: its label, the model's prediction,
its loss and a small rendering of its input. Images become a PNG thumbnail (base64, at most
``MAX_THUMBNAIL_SIDE`` pixels a side, min-max normalised like the TensorBoard grids); other inputs (tabular
features, token ids) become their first ``MAX_VALUES`` values. See ``docs/output-format.md``.
"""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import torch
import torch.nn.functional as F

from lightning_influence.core.tensors.batching import looks_like_image
from lightning_influence.reporting._format import to_builtin
from lightning_influence.results import InfluenceReport, MislabelReport

MAX_THUMBNAIL_SIDE = 64
MAX_VALUES = 64


def render_input(x: torch.Tensor | None) -> dict[str, Any] | None:
    """A JSON rendering of one input: ``{"kind": "image", "shape", "png"}`` (base64 PNG) for images,
    ``{"kind": "values", "shape", "values", "truncated"}`` for anything else, None without an input.

    Example:
        >>> render_input(torch.arange(3.0))
        {'kind': 'values', 'shape': [3], 'values': [0.0, 1.0, 2.0], 'truncated': False}
    """
    if not isinstance(x, torch.Tensor) or x.is_complex():
        return None
    x = x.detach().cpu()
    if looks_like_image(x):
        return {"kind": "image", "shape": list(x.shape), "png": base64.b64encode(_png(_thumbnail(x))).decode("ascii")}
    flat = x.reshape(-1)
    values = flat[:MAX_VALUES]
    if values.is_floating_point():
        shown = [to_builtin(float(f"{float(v):.4g}")) for v in values.tolist()]
    else:
        shown = to_builtin(values.tolist())
    return {"kind": "values", "shape": list(x.shape), "values": shown, "truncated": flat.numel() > MAX_VALUES}


def report_examples(report: InfluenceReport) -> dict[str, Any]:
    """Every example the report lists: ``{"val": {index: entry}, "train": {index: entry}}`` with entries
    ``{"label", "prediction", "loss", "input"}`` (``input`` from :func:`render_input`)."""
    val: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for point in report.points:
        val[str(point.val_index)] = _entry(point.label, point.prediction, point.loss, point.input, point.text)
        for influencer in (*point.harmful, *point.helpful):
            train.setdefault(str(influencer.train_index), _entry(
                influencer.label, influencer.prediction, influencer.loss, influencer.input, influencer.text))
    return {"val": val, "train": train}


def mislabel_examples(report: MislabelReport) -> dict[str, Any]:
    """Every mislabel candidate's rendering, once per example: ``{"train": {index: entry}}`` as in
    :func:`report_examples` (past the first ``MISLABEL_SHOWN`` candidates the analysis keeps a small thumbnail
    of each input, so their images are at most ``THUMBNAIL_SIDE`` pixels a side)."""
    train = {str(c.train_index): _entry(c.label, c.prediction, c.loss, c.input, c.text) for c in report.candidates}
    return {"val": {}, "train": train}


def _entry(label: Any, prediction: Any, loss: Any, x: torch.Tensor | None, text: str | None = None) -> dict[str, Any]:
    entry = {"label": to_builtin(label), "prediction": to_builtin(prediction),
             "loss": to_builtin(None if loss is None else float(loss)), "input": render_input(x)}
    return entry if text is None else {**entry, "text": text}


def _thumbnail(x: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` or ``[H, W, C]`` uint8, at most ``MAX_THUMBNAIL_SIDE`` a side, normalised to [0, 255]."""
    image = x.to(torch.float64)
    image = image.unsqueeze(0) if image.ndim == 2 else image[:3]
    height, width = image.shape[-2:]
    factor = max(height, width) / MAX_THUMBNAIL_SIDE
    if factor > 1:
        size = (max(1, round(height / factor)), max(1, round(width / factor)))
        image = F.adaptive_avg_pool2d(image.unsqueeze(0), size)[0]
    image = torch.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    pixels = (image * 255).round().to(torch.uint8)
    return pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0)


def _png(pixels: torch.Tensor) -> bytes:
    """Encode ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB) uint8 pixels as a PNG, with the standard library only."""
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.reshape(height, -1).numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
