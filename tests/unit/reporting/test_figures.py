"""What the figures show (#18): one block of rows per group, epoch and step in every title, one colour meaning
across figures, and a table that explains a missing picture for non-image inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from matplotlib.colors import to_rgba

from lightning_influence.reporting import (
    ExplainedPoint,
    Influencer,
    InfluenceReport,
    MislabelCandidate,
    MislabelReport,
    SolverSummary,
    influence_grid_figure,
    mislabel_grid_figure,
    mislabel_markdown,
    point_markdown,
    write_mislabel_report,
    write_report,
)
from lightning_influence.reporting.images import COLOUR_KEY, COLOURS, GROUP_HEADINGS

SOLVER = SolverSummary("cg", 0.01, True, 1.0)


def make_point(harmful: int, helpful: int, shape: tuple[int, ...] = (1, 8, 8), dtype=torch.float32) -> ExplainedPoint:
    generator = torch.Generator().manual_seed(0)

    def x() -> torch.Tensor:
        if dtype == torch.long:
            return torch.randint(0, 1000, shape, generator=generator)
        return torch.rand(shape, generator=generator)

    return ExplainedPoint(
        5, 3, 8, 1.5,
        tuple(Influencer(100 + k, 1.0 / (k + 1), label=1, prediction=1, input=x()) for k in range(harmful)),
        tuple(Influencer(200 + k, -1.0 / (k + 1), label=2, prediction=2, input=x()) for k in range(helpful)),
        input=x(),
    )


def make_mislabel(shape: tuple[int, ...] = (1, 8, 8)) -> MislabelReport:
    candidates = tuple(
        MislabelCandidate(10 + k, -1.0 / (k + 1), 0.5, k, label=k, prediction=k if k % 2 else k + 1,
                          input=torch.rand(shape, generator=torch.Generator().manual_seed(k)))
        for k in range(4)
    )
    return MislabelReport(4, 321, 100, candidates, SOLVER, seconds=1.0)


def role_of(caption: str) -> str:
    return "validation" if caption.startswith("val #") else caption.split()[-1]


def rows_by_role(figure: Any) -> list[list[str]]:
    """The roles of the tiles on each row of the grid, top row first."""
    rows: dict[float, list[str]] = {}
    for ax in figure.axes:
        top = round(ax.get_position(original=True).y1, 6)
        rows.setdefault(top, []).append(role_of(ax.get_xlabel()))
    return [rows[top] for top in sorted(rows, reverse=True)]


def headings(figure: Any) -> list[Any]:
    return [text for text in figure.texts if text is not figure._suptitle]


def test_each_group_has_rows_of_its_own_and_wraps_within_itself() -> None:
    figure = influence_grid_figure(make_point(harmful=9, helpful=3), max_columns=8)
    assert rows_by_role(figure) == [["validation"], ["harmful"] * 8, ["harmful"], ["helpful"] * 3]
    assert [text.get_text() for text in headings(figure)] == [GROUP_HEADINGS[g] for g in ("validation", "harmful", "helpful")]
    tops = {text.get_text(): text.get_position()[1] for text in headings(figure)}
    harmful_tiles = [ax.get_position(original=True) for ax in figure.axes if "harmful" in ax.get_xlabel()]
    assert tops[GROUP_HEADINGS["harmful"]] > max(p.y1 for p in harmful_tiles)  # heading above its block
    assert tops[GROUP_HEADINGS["helpful"]] < min(p.y0 for p in harmful_tiles)  # and below the previous one
    # the same point with max_columns=3: every group still starts a row of its own
    assert rows_by_role(influence_grid_figure(make_point(4, 2), max_columns=3)) == [
        ["validation"], ["harmful"] * 3, ["harmful"], ["helpful"] * 2]
    # no helpful examples: no helpful heading, no empty block
    figure = influence_grid_figure(make_point(2, 0))
    assert rows_by_role(figure) == [["validation"], ["harmful"] * 2]
    assert GROUP_HEADINGS["helpful"] not in [t.get_text() for t in headings(figure)]
    figure.canvas.draw()


def test_titles_carry_epoch_and_step() -> None:
    title = influence_grid_figure(make_point(1, 1), epoch=7, global_step=456)._suptitle.get_text()
    assert "epoch 7, step 456" in title and "Validation #5" in title
    assert "epoch not given, step not given" in influence_grid_figure(make_point(1, 1))._suptitle.get_text()
    assert "epoch 4, step 321" in mislabel_grid_figure(make_mislabel())._suptitle.get_text()


class RecordingWriter:
    """Keeps what write_report / write_mislabel_report hand to a SummaryWriter."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.texts: dict[str, str] = {}

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None) -> None:
        self.figures[tag] = figure

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
        self.texts[tag] = text_string

    def add_histogram(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass


def test_written_figures_are_titled_with_the_reports_epoch_and_step() -> None:
    writer = RecordingWriter()
    write_report(writer, InfluenceReport(6, 789, "fit_end", 100, (make_point(2, 2),), SOLVER))
    write_mislabel_report(writer, make_mislabel())
    assert "epoch 6, step 789" in writer.figures["influence/val_5/examples"]._suptitle.get_text()
    assert "epoch 4, step 321" in writer.figures["influence/mislabel/examples"]._suptitle.get_text()


def frame(ax: Any) -> tuple[float, ...]:
    return tuple(ax.spines["top"].get_edgecolor())


def test_one_colour_meaning_across_figures() -> None:
    red = to_rgba(COLOURS["harmful"])
    grid = influence_grid_figure(make_point(2, 2))
    for ax in grid.axes:
        assert frame(ax) == to_rgba(COLOURS[role_of(ax.get_xlabel())])
    mislabel = mislabel_grid_figure(make_mislabel())
    assert all(frame(ax) == to_rgba(COLOURS["candidate"]) != red for ax in mislabel.axes)
    assert all(to_rgba(ax.xaxis.label.get_color()) != red for ax in mislabel.axes)
    # prediction != label is marked by a symbol in the caption, not by a colour
    captions = [ax.get_xlabel() for ax in mislabel.axes]
    assert ["\u2260 pred" in c for c in captions] == [True, False, True, False]
    for figure in (grid, mislabel):
        assert COLOUR_KEY in figure._suptitle.get_text()
    assert len(set(COLOURS.values())) == len(COLOURS)


@pytest.mark.parametrize(
    ("shape", "dtype", "cell"),
    [((6,), torch.float32, "values)"), ((12,), torch.long, "ids ")],
    ids=["tabular", "tokens"],
)
def test_non_image_inputs_get_a_readable_table_and_a_reason_for_no_picture(shape, dtype, cell) -> None:
    point = make_point(2, 1, shape=shape, dtype=dtype)
    writer = RecordingWriter()
    write_report(writer, InfluenceReport(1, 10, "fit_end", 100, (point,), SOLVER))
    assert writer.figures == {}
    table = writer.texts["influence/val_5/table"]
    assert "| example |" in table.splitlines()[4]
    rows = [line for line in table.splitlines() if line.startswith("| validation") or "#1 |" in line]
    assert len(rows) == 3 and all(cell in row for row in rows)
    first = point.input.reshape(-1)[0]
    assert (str(int(first)) if dtype == torch.long else f"{float(first):.3g}") in rows[0]
    assert f"No image grid: the inputs are not images (shape {list(shape)})" in table
    # mislabel: the same column and the same sentence
    report = make_mislabel(shape=shape)
    text = mislabel_markdown(report)
    assert "example" in text and "No image grid: the inputs are not images" in text
    write_mislabel_report(writer, report)
    assert "influence/mislabel/examples" not in writer.figures


def test_missing_inputs_are_explained_and_images_need_no_note() -> None:
    bare = ExplainedPoint(5, 3, 8, 1.5, (Influencer(1, 0.1),), ())
    assert "No image grid: the examples' inputs were not kept" in point_markdown(bare, SOLVER)
    images = point_markdown(make_point(1, 1), SOLVER)
    assert "No image grid" not in images and "example" not in images.splitlines()[4]
