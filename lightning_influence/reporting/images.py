"""Captioned image grids: a validation example beside its most harmful and most helpful training examples.

TensorBoard image events carry no caption, so every caption is drawn into the figure itself. The figures
are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``: no global
backend is selected or changed, and the caller's figures and windows are left alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_influence.core.batching import IMAGE_CHANNELS, MIN_IMAGE_SIDE, looks_like_image
from lightning_influence.reporting._format import format_float, format_influence, format_value
from lightning_influence.results import (
    ExplainedPoint,
    Influencer,
    MislabelCandidate,
    MislabelReport,
)

MAX_COLUMNS = 8
MAX_CAPTION_VALUE = 12  # characters of a label or prediction shown under a tile
TILE_INCHES = 1.7
CAPTION_INCHES = 0.75
TITLE_INCHES = 0.75
MAX_TITLE_VALUE = 24  # characters of the validation label or prediction shown in the title
TILE_PAD_INCHES = 0.1
MIN_WIDTH_INCHES = 5.5  # room for the two title lines when there are only a few tiles
ROLE_COLOURS = {"validation": "tab:blue", "harmful": "tab:red", "helpful": "tab:green"}
MISLABEL_CAPTION_INCHES = 0.95  # five caption lines under each mislabel tile
MISLABEL_TITLE_INCHES = 1.0  # four title lines
MISLABEL_COLOURS = {"disagrees": "tab:red", "fits": "tab:orange"}


def influence_grid_figure(point: ExplainedPoint, max_columns: int = MAX_COLUMNS) -> Figure:
    """Draw the validation example, then its top harmful, then its top helpful training examples.

    Each tile is normalised to [0, 1] (grayscale for one channel), framed in the colour of its role
    (blue validation, red harmful, green helpful) and captioned with its dataset index, label,
    prediction and influence. The title names the validation point and the sign convention.

    Args:
        point: the explained validation point; it and all its influencers must carry image inputs.
        max_columns: tiles per row before wrapping onto a new row.

    Returns:
        A matplotlib figure with an Agg canvas, not registered with ``pyplot`` (no need to close it).

    Raises:
        ValueError: if an input is missing or does not look like an image.
    """
    tiles = [(ROLE_COLOURS["validation"], _validation_caption(point), _tile_input(point.input, "point.input"))]
    for role, influencers in (("harmful", point.harmful), ("helpful", point.helpful)):
        for rank, influencer in enumerate(influencers, start=1):
            name = f"point.{role}[{rank - 1}].input"
            tiles.append((ROLE_COLOURS[role], _influencer_caption(influencer, role), _tile_input(influencer.input, name)))
    if max_columns < 1:
        raise ValueError(f"Expected `max_columns` to be a positive integer, but got {max_columns}.")
    return _grid_figure(tiles, _title(point), max_columns, TITLE_INCHES, CAPTION_INCHES)


def _grid_figure(
    tiles: list[tuple[str, str, np.ndarray]], title: str, max_columns: int, title_inches: float, caption_inches: float
) -> Figure:
    """A captioned grid of ``(frame colour, caption, image)`` tiles, ``max_columns`` per row, under ``title``."""
    columns = min(len(tiles), max_columns)
    rows = math.ceil(len(tiles) / columns)
    width = max(columns * TILE_INCHES, MIN_WIDTH_INCHES)
    height = title_inches + rows * (TILE_INCHES + caption_inches)
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    for position, (colour, caption, image) in enumerate(tiles):
        row, column = divmod(position, columns)
        rect = _tile_rect(row, column, columns, width, height, title_inches, caption_inches)
        _draw_tile(figure.add_axes(rect), image, caption, colour)
    figure.suptitle(title, fontsize=9, y=1 - TILE_PAD_INCHES / height, va="top")
    return figure


def _tile_rect(
    row: int,
    column: int,
    columns: int,
    width: float,
    height: float,
    title_inches: float = TITLE_INCHES,
    caption_inches: float = CAPTION_INCHES,
) -> tuple[float, float, float, float]:
    """Figure-fraction rectangle of one tile: a fixed grid (centred), the caption space left below it.

    The layout is computed, not left to a layout engine: fixed-aspect image axes with multi-line labels
    are where constrained layout clips captions.
    """
    left = (width - columns * TILE_INCHES) / 2 + column * TILE_INCHES + TILE_PAD_INCHES
    top = height - title_inches - row * (TILE_INCHES + caption_inches) - TILE_PAD_INCHES
    side = TILE_INCHES - 2 * TILE_PAD_INCHES
    return (left / width, (top - side) / height, side / width, side / height)


def _tile_input(x: torch.Tensor | None, name: str) -> np.ndarray:
    """Check one input and convert it to a displayable ``[H, W]`` or ``[H, W, 3]`` array in [0, 1]."""
    if x is None or not looks_like_image(x):
        got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)
        raise ValueError(
            f"Expected `{name}` to be an image tensor shaped [C, H, W] with C in {IMAGE_CHANNELS} or [H, W], "
            f"H, W >= {MIN_IMAGE_SIDE}, but got {got}. Check `looks_like_image` before drawing a grid."
        )
    image = x.detach().to("cpu", torch.float64)
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else image[:3].permute(1, 2, 0)  # drop alpha for display
    return _normalise(image.numpy())


def _normalise(image: np.ndarray) -> np.ndarray:
    """Min-max scale one tile to [0, 1]; constant or non-finite tiles become mid grey."""
    finite = np.isfinite(image)
    if not finite.any():
        return np.full_like(image, 0.5)
    low, high = image[finite].min(), image[finite].max()
    if high - low <= 0:
        return np.full_like(image, 0.5)
    return np.where(finite, (image - low) / (high - low), 0.5)


def _draw_tile(ax: Axes, image: np.ndarray, caption: str, colour: str) -> None:
    """Show one tile with a coloured frame and its caption underneath."""
    cmap = "gray" if image.ndim == 2 else None  # colour maps apply to single-channel tiles only
    ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
    ax.set_xlabel(caption, fontsize=8, color=colour, linespacing=1.3)


def _validation_caption(point: ExplainedPoint) -> str:
    return f"val #{point.val_index}\n{_label_lines(point.label, point.prediction)}\nloss {format_float(point.loss, 3)}"


def _influencer_caption(influencer: Influencer, role: str) -> str:
    return (
        f"train #{influencer.train_index}\n{_label_lines(influencer.label, influencer.prediction)}\n"
        f"I={format_influence(influencer.influence)} {role}"
    )


def _label_lines(label: object, prediction: object) -> str:
    """``label 3`` and ``pred 8`` lines, each value cut to fit under a tile (the markdown table has it all)."""
    return f"label {_short(format_value(label))}\npred {_short(format_value(prediction))}"


def _short(text: str, limit: int = MAX_CAPTION_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _title(point: ExplainedPoint) -> str:
    label = _short(format_value(point.label), MAX_TITLE_VALUE)
    prediction = _short(format_value(point.prediction), MAX_TITLE_VALUE)
    return (
        f"Validation #{point.val_index} (loss {format_float(point.loss)})\n"
        f"label {label}, prediction {prediction}\n"
        "positive influence = harmful (red), negative = helpful (green)"
    )


def mislabel_grid_figure(report: MislabelReport, max_columns: int = MAX_COLUMNS) -> Figure:
    """Draw the mislabel candidates of ``report``, strongest ``|I(z, z)|`` first, each captioned.

    Each tile is normalised to [0, 1] and captioned with its training index, given label, prediction,
    self-influence ``I(z, z)`` and its rank by training loss (1 = highest loss, the plain baseline). The
    frame is red when the model's prediction differs from the given label and orange when the model fits
    the given label (a memorised example: only self-influence can still point at it). The title says what
    is shown and how it was computed.

    Args:
        report: the mislabel analysis; every candidate must carry an image input, and there must be one.
        max_columns: tiles per row before wrapping onto a new row.

    Returns:
        A matplotlib figure with an Agg canvas, not registered with ``pyplot`` (no need to close it).

    Raises:
        ValueError: if there are no candidates, or an input is missing or does not look like an image.
    """
    if max_columns < 1:
        raise ValueError(f"Expected `max_columns` to be a positive integer, but got {max_columns}.")
    if not report.candidates:
        raise ValueError("Expected `report.candidates` to hold at least one candidate, but it is empty.")
    tiles = [
        (_mislabel_colour(candidate), _candidate_caption(candidate, rank),
         _tile_input(candidate.input, f"report.candidates[{rank - 1}].input"))
        for rank, candidate in enumerate(report.candidates, start=1)
    ]
    return _grid_figure(tiles, _mislabel_title(report), max_columns, MISLABEL_TITLE_INCHES, MISLABEL_CAPTION_INCHES)


def _mislabel_colour(candidate: MislabelCandidate) -> str:
    same = format_value(candidate.label) == format_value(candidate.prediction)
    return MISLABEL_COLOURS["fits" if same else "disagrees"]


def _candidate_caption(candidate: MislabelCandidate, rank: int) -> str:
    return (
        f"#{rank}: train #{candidate.train_index}\n{_label_lines(candidate.label, candidate.prediction)}\n"
        f"I(z,z)={format_influence(candidate.self_influence)}\nloss rank {candidate.loss_rank + 1}"
    )


def _mislabel_title(report: MislabelReport) -> str:
    solver = report.solver
    return (
        "Training examples the model bent most to fit:\nlarge |I(z,z)| = likely mislabelled, strongest first\n"
        f"epoch {report.epoch}, step {report.global_step}, top {len(report.candidates)} of {report.train_size}; "
        f"{solver.solver}, damping {format_float(solver.damping, 3)}\n"
        "red: prediction \u2260 given label; orange: fitted; loss rank 1 = highest loss"
    )
