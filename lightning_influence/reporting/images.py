"""Captioned image grids: a validation example beside its most harmful and most helpful training examples.

TensorBoard image events carry no caption, so every caption is drawn into the figure itself. The figures
are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``: no global
backend is selected or changed, and the caller's figures and windows are left alone.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_influence.core.tensors.batching import IMAGE_CHANNELS, MIN_IMAGE_SIDE, looks_like_image
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
TITLE_INCHES = 1.0  # four title lines
HEADING_INCHES = 0.3  # the label line above each group of tiles
MAX_TITLE_VALUE = 24  # characters of the validation label or prediction shown in the title
TILE_PAD_INCHES = 0.1
MIN_WIDTH_INCHES = 6.5  # room for the title lines when there are only a few tiles
COLOURS = {"validation": "tab:blue", "harmful": "tab:red", "helpful": "tab:green", "candidate": "tab:purple"}
"""The frame colours, one meaning in every figure (and in the dashboard): red is only ever harmful."""
COLOUR_KEY = "frames: red = harmful (raises the loss), green = helpful, blue = validation, purple = candidate"
"""The colour key every figure's title ends with."""
GROUP_HEADINGS = {
    "validation": "validation example",
    "harmful": "harmful: up-weighting raises its loss (positive influence), strongest first",
    "helpful": "helpful: up-weighting lowers its loss (negative influence), strongest first",
}
MISLABEL_CAPTION_INCHES = 0.95  # five caption lines under each mislabel tile
MISLABEL_TITLE_INCHES = 1.15  # five title lines
DIFFERS = "\u2260"  # marks a prediction that differs from the given label (text, not colour)

Tile = tuple[str, str, np.ndarray]  # frame colour, caption, image
Group = tuple[Optional[str], str, list[Tile]]  # heading (None: no heading line), heading colour, tiles


def influence_grid_figure(
    point: ExplainedPoint,
    max_columns: int = MAX_COLUMNS,
    *,
    epoch: int | None = None,
    global_step: int | None = None,
) -> Figure:
    """Draw the validation example, then its top harmful, then its top helpful training examples.

    Each group has rows of its own under a heading line (``validation example``, ``harmful: ...``,
    ``helpful: ...``): a group wraps onto further rows after ``max_columns`` tiles and never shares a row
    with another group. Each tile is normalised to [0, 1] (grayscale for one channel), framed in the
    colour of its role (:data:`COLOURS`: blue validation, red harmful, green helpful) and captioned with
    its dataset index, label, prediction and influence. The title names the validation point, the epoch
    and global step, the sign convention and the colour key.

    Args:
        point: the explained validation point; it and all its influencers must carry image inputs.
        max_columns: tiles per row before a group wraps onto a new row.
        epoch: the epoch of the analysis, shown in the title (``write_report`` passes the report's).
        global_step: the global step of the analysis, shown in the title.

    Returns:
        A matplotlib figure with an Agg canvas, not registered with ``pyplot`` (no need to close it).

    Raises:
        ValueError: if an input is missing or does not look like an image.
    """
    if max_columns < 1:
        raise ValueError(f"Expected `max_columns` to be a positive integer, but got {max_columns}.")
    groups: list[Group] = [(
        GROUP_HEADINGS["validation"], COLOURS["validation"],
        [(COLOURS["validation"], _validation_caption(point), _tile_input(point.input, "point.input"))],
    )]
    for role, influencers in (("harmful", point.harmful), ("helpful", point.helpful)):
        tiles = [
            (COLOURS[role], _influencer_caption(influencer, role),
             _tile_input(influencer.input, f"point.{role}[{rank}].input"))
            for rank, influencer in enumerate(influencers)
        ]
        if tiles:
            groups.append((GROUP_HEADINGS[role], COLOURS[role], tiles))
    title = _title(point, epoch, global_step)
    return _grid_figure(groups, title, max_columns, TITLE_INCHES, CAPTION_INCHES)


def _grid_figure(
    groups: list[Group], title: str, max_columns: int, title_inches: float, caption_inches: float
) -> Figure:
    """Captioned tiles under ``title``, each group on rows of its own (``max_columns`` tiles a row) below its
    heading line. The layout is computed, not left to a layout engine: fixed-aspect image axes with
    multi-line labels are where constrained layout clips captions."""
    columns = max(1, min(max_columns, max(len(tiles) for _, _, tiles in groups)))
    row_inches = TILE_INCHES + caption_inches
    height = title_inches + sum(
        (HEADING_INCHES if heading else 0.0) + math.ceil(len(tiles) / columns) * row_inches
        for heading, _, tiles in groups
    )
    width = max(columns * TILE_INCHES, MIN_WIDTH_INCHES)
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    left = (width - columns * TILE_INCHES) / 2
    top = title_inches  # inches from the top of the figure
    for heading, colour, tiles in groups:
        if heading:
            figure.text((left + TILE_PAD_INCHES) / width, 1 - (top + HEADING_INCHES / 2) / height, heading,
                        color=colour, fontsize=8, fontweight="bold", va="center", ha="left")
            top += HEADING_INCHES
        for position, (frame, caption, image) in enumerate(tiles):
            row, column = divmod(position, columns)
            rect = _tile_rect(left + column * TILE_INCHES, top + row * row_inches, width, height)
            _draw_tile(figure.add_axes(rect), image, caption, frame)
        top += math.ceil(len(tiles) / columns) * row_inches
    figure.suptitle(title, fontsize=9, y=1 - TILE_PAD_INCHES / height, va="top")
    return figure


def _tile_rect(left: float, top: float, width: float, height: float) -> tuple[float, float, float, float]:
    """Figure-fraction rectangle of the tile whose cell starts ``left`` inches from the left edge and ``top``
    inches below the top edge (the caption space is left below it)."""
    side = TILE_INCHES - 2 * TILE_PAD_INCHES
    bottom = height - top - TILE_PAD_INCHES - side
    return ((left + TILE_PAD_INCHES) / width, bottom / height, side / width, side / height)


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


def _label_lines(label: object, prediction: object, mark_differs: bool = False) -> str:
    """``label 3`` and ``pred 8`` lines, each value cut to fit under a tile (the markdown table has it all);
    with ``mark_differs`` a prediction that differs from the label reads ``\u2260 pred 8``."""
    differs = mark_differs and format_value(label) != format_value(prediction)
    return f"label {_short(format_value(label))}\n{DIFFERS + ' ' if differs else ''}pred {_short(format_value(prediction))}"


def _short(text: str, limit: int = MAX_CAPTION_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _when(epoch: int | None, global_step: int | None) -> str:
    """``epoch 3, step 120`` (each part says when it was not given)."""
    return (f"epoch {'not given' if epoch is None else epoch}, "
            f"step {'not given' if global_step is None else global_step}")


def _title(point: ExplainedPoint, epoch: int | None, global_step: int | None) -> str:
    label = _short(format_value(point.label), MAX_TITLE_VALUE)
    prediction = _short(format_value(point.prediction), MAX_TITLE_VALUE)
    return (
        f"Validation #{point.val_index} at {_when(epoch, global_step)} (loss {format_float(point.loss)})\n"
        f"label {label}, prediction {prediction}\n"
        "positive influence = harmful, negative = helpful\n"
        f"{COLOUR_KEY}"
    )


def mislabel_grid_figure(report: MislabelReport, max_columns: int = MAX_COLUMNS) -> Figure:
    """Draw the mislabel candidates of ``report``, strongest ``|I(z, z)|`` first, each captioned.

    Each tile is normalised to [0, 1], framed in the candidate colour (purple, :data:`COLOURS`: red means
    harmful in every figure, so it is not used here) and captioned with its training index, given label,
    prediction (marked ``\u2260 pred`` when it differs from the given label), self-influence ``I(z, z)`` and
    its rank by training loss (1 = highest loss, the plain baseline). The title says what is shown, the
    epoch and global step, how it was computed and the colour key.

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
        (COLOURS["candidate"], _candidate_caption(candidate, rank),
         _tile_input(candidate.input, f"report.candidates[{rank - 1}].input"))
        for rank, candidate in enumerate(report.candidates, start=1)
    ]
    groups: list[Group] = [(None, COLOURS["candidate"], tiles)]
    return _grid_figure(groups, _mislabel_title(report), max_columns, MISLABEL_TITLE_INCHES, MISLABEL_CAPTION_INCHES)


def _candidate_caption(candidate: MislabelCandidate, rank: int) -> str:
    return (
        f"#{rank}: train #{candidate.train_index}\n"
        f"{_label_lines(candidate.label, candidate.prediction, mark_differs=True)}\n"
        f"I(z,z)={format_influence(candidate.self_influence)}\nloss rank {candidate.loss_rank + 1}"
    )


def _mislabel_title(report: MislabelReport) -> str:
    solver = report.solver
    return (
        "Training examples the model bent most to fit:\nlarge |I(z,z)| = likely mislabelled, strongest first\n"
        f"{_when(report.epoch, report.global_step)}, top {len(report.candidates)} of {report.train_size}; "
        f"{solver.solver}, damping {format_float(solver.damping, 3)}\n"
        f"{DIFFERS} pred: prediction differs from the given label; loss rank 1 = highest loss\n"
        f"{COLOUR_KEY}"
    )
