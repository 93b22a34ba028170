"""Tests of the mislabel reporting: TensorBoard events, markdown, JSON, console and the image grid."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_influence.reporting import (
    MislabelCandidate,
    MislabelReport,
    SolverSummary,
    mislabel_grid_figure,
    mislabel_markdown,
    mislabel_to_dict,
    print_mislabel_summary,
    write_mislabel_files,
    write_mislabel_report,
)
from lightning_influence.reporting.tables import mislabel_confusion_markdown

TEXT = "/text_summary"  # torch's SummaryWriter.add_text appends this to every text tag
SIZE_GUIDANCE = {"images": 0, "scalars": 0, "tensors": 0, "histograms": 0}
TRAIN_INDICES = (17, 4, 230, 99, 5)
LOSS_RANKS = (0, 12, 2, 40, 3)  # 0-based: 17, 230 and 5 are also in the loss top 5; 4 and 99 are not
TAGS = ("influence/mislabel/examples", "influence/mislabel/table", "influence/mislabel/self_influence")


def make_report(input_shape: tuple[int, ...] = (1, 8, 8), scores: bool = True) -> MislabelReport:
    """Five candidates, strongest first; labels and predictions mix ints and tensors."""
    generator = torch.Generator().manual_seed(0)
    candidates = tuple(
        MislabelCandidate(
            train_index=index,
            self_influence=-1.5 / (rank + 1),
            loss=2.0 / (rank + 1),
            loss_rank=loss_rank,
            label=torch.tensor(rank),
            prediction=rank if rank % 2 else rank + 1,  # even ranks disagree with their label
            input=torch.rand(input_shape, generator=generator),
        )
        for rank, (index, loss_rank) in enumerate(zip(TRAIN_INDICES, LOSS_RANKS))
    )
    solver = SolverSummary("lowrank", 1e-2, True, 1.5, settings={"rank": 64, "iterations": 128})
    values = -torch.rand(300, generator=generator, dtype=torch.float64) if scores else None
    return MislabelReport(2, 80, 300, candidates, solver, seconds=2.25, scores=values)


def write_events(directory: Path, report: MislabelReport) -> EventAccumulator:
    writer = SummaryWriter(log_dir=str(directory))
    write_mislabel_report(writer, report)
    writer.close()
    (event_file,) = directory.glob("events.out.tfevents.*")
    return EventAccumulator(str(event_file), size_guidance=SIZE_GUIDANCE).Reload()


def text_of(events: EventAccumulator, tag: str) -> str:
    (event,) = events.Tensors(tag + TEXT)
    return event.tensor_proto.string_val[0].decode()


def test_tensorboard_tags(tmp_path: Path) -> None:
    report = make_report()
    events = write_events(tmp_path, report)
    tags = events.Tags()
    assert tags["images"] == ["influence/mislabel/examples"]
    assert events.Images("influence/mislabel/examples")[0].step == report.global_step
    assert sorted(tags["tensors"]) == [f"influence/mislabel/per_class{TEXT}", f"influence/mislabel/table{TEXT}"]
    assert events.SummaryMetadata(f"influence/mislabel/table{TEXT}").plugin_data.plugin_name == "text"
    table = text_of(events, "influence/mislabel/table")
    assert all(f"| {index} |" in table for index in TRAIN_INDICES)
    (histogram,) = events.Histograms("influence/mislabel/self_influence")
    assert histogram.step == report.global_step and histogram.histogram_value.num == 300
    (seconds,) = events.Scalars("influence/mislabel/seconds")
    assert seconds.step == report.global_step and seconds.value == pytest.approx(2.25)


def test_flat_inputs_give_no_image_and_no_scores_no_histogram(tmp_path: Path) -> None:
    events = write_events(tmp_path, make_report(input_shape=(64,), scores=False))
    tags = events.Tags()
    assert tags["images"] == [] and tags["histograms"] == []
    assert sorted(tags["tensors"]) == [f"influence/mislabel/per_class{TEXT}", f"influence/mislabel/table{TEXT}"]
    assert tags["scalars"] == ["influence/mislabel/seconds"]


def test_one_missing_input_skips_the_image(tmp_path: Path) -> None:
    report = make_report()
    candidates = (*report.candidates[:-1], replace(report.candidates[-1], input=None))
    events = write_events(tmp_path, replace(report, candidates=candidates))
    assert events.Tags()["images"] == []


def test_empty_report(tmp_path: Path) -> None:
    report = replace(make_report(), candidates=())
    events = write_events(tmp_path, report)
    assert events.Tags()["images"] == []
    assert "No candidates" in text_of(events, "influence/mislabel/table")
    assert mislabel_to_dict(report)["candidates"] == []


def test_markdown_rows_and_agreement() -> None:
    report = make_report()
    text = mislabel_markdown(report)
    for rank, candidate in enumerate(report.candidates, start=1):
        assert f"| {rank} | {candidate.train_index} |" in text
    assert "| rank | dataset index | given label | prediction | self-influence |" in text
    assert "3 of the top 5 by self-influence are also in the top 5 by training loss" in text
    assert "lowrank" in text and "damping 0.01" in text and "2.25 s" in text
    first = text.splitlines()[-5]
    assert first == "| 1 | 17 | 0 | 1 | -1.50e+00 | 2 | 1 |"  # loss rank shown 1-based


def test_json_round_trip(tmp_path: Path) -> None:
    report = make_report()
    path = write_mislabel_files(tmp_path / "out", report)
    assert path.name == "mislabel_epoch=2.json"
    loaded = json.loads(path.read_text())
    assert loaded == mislabel_to_dict(report)
    assert loaded["schema_version"] == 1 and loaded["train_size"] == 300
    assert (loaded["epoch"], loaded["global_step"], loaded["seconds"]) == (2, 80, 2.25)
    assert loaded["solver"]["solver"] == "lowrank" and loaded["solver"]["damping"] == 0.01
    assert loaded["solver"]["settings"] == {"rank": 64, "iterations": 128}
    for candidate, entry in zip(report.candidates, loaded["candidates"]):
        assert entry == {
            "train_index": candidate.train_index,
            "self_influence": candidate.self_influence,
            "loss": candidate.loss,
            "loss_rank": candidate.loss_rank,
            "label": int(candidate.label),
            "prediction": candidate.prediction,
            "score": None,  # no training signals in this report
            "suggested_label": None,
            "flagged": None,
        }
    assert loaded["ranking"] == "self_influence" and loaded["training_signals"]["recorded"] is False
    assert loaded["estimated_flips"] is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["mislabel_epoch=2.json"]


def test_json_non_finite_loss_becomes_null(tmp_path: Path) -> None:
    report = make_report()
    candidates = (replace(report.candidates[0], loss=float("inf")), *report.candidates[1:])
    loaded = json.loads(write_mislabel_files(tmp_path, replace(report, candidates=candidates)).read_text())
    assert loaded["candidates"][0]["loss"] is None


def test_grid_figure_captions_and_errors() -> None:
    report = make_report()
    figure = mislabel_grid_figure(report, max_columns=3)
    captions = [ax.get_xlabel() for ax in figure.axes]
    assert len(captions) == len(TRAIN_INDICES)
    assert captions[0].startswith("#1: train #17") and "loss rank 1" in captions[0]
    assert "I(z,z)=-1.50e+00" in captions[0] and "label 0" in captions[0] and "pred 1" in captions[0]
    assert "likely mislabelled" in figure._suptitle.get_text()
    assert figure.axes[3].get_position().y1 < figure.axes[0].get_position().y0  # wrapped onto a second row
    figure.canvas.draw()
    with pytest.raises(ValueError, match=r"Expected `report.candidates\[0\].input`"):
        mislabel_grid_figure(make_report(input_shape=(64,)))
    with pytest.raises(ValueError, match="at least one candidate"):
        mislabel_grid_figure(replace(report, candidates=()))
    with pytest.raises(ValueError, match="Expected `max_columns`"):
        mislabel_grid_figure(report, max_columns=0)


def test_console_summary() -> None:
    report = make_report()
    buffer = io.StringIO()
    print_mislabel_summary(report, console=Console(file=buffer, width=160))
    text = buffer.getvalue()
    assert all(str(index) in text for index in TRAIN_INDICES)
    assert "lowrank" in text and "-1.50e+00" in text and "3 of the top 5" in text


def test_per_class_table_counts_planted_pairs_largest_first() -> None:
    """Given/suggested pairs planted: 4 x (8 -> 3), 2 x (1 -> 7), 1 x (5 -> 6); without a suggested label the
    prediction counts."""
    pairs = [(8, 3)] * 4 + [(1, 7)] * 2 + [(5, 6)]
    candidates = tuple(
        MislabelCandidate(train_index=i, self_influence=-1.0, loss=1.0, loss_rank=i, label=given, prediction=given,
                          score=1.0 / (i + 1), suggested_label=suggested)
        for i, (given, suggested) in enumerate(pairs)
    )
    report = replace(make_report(), candidates=candidates, ranking="el2n_window",
                     signals={"epochs": [0, 4, 9], "seconds": 0.5, "default": "el2n_window"})
    text = mislabel_confusion_markdown(report)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| 8 | 3 | 4 | 57% |", "| 1 | 7 | 2 | 29% |", "| 5 | 6 | 1 | 14% |"]
    assert "suggested label (training signals)" in text
    plain = replace(report, candidates=tuple(replace(c, suggested_label=None, prediction=2) for c in candidates),
                    signals=None, ranking="self_influence")
    rows = [line for line in mislabel_confusion_markdown(plain).splitlines() if line.startswith("| ")][2:]
    assert rows == ["| 8 | 2 | 4 | 57% |", "| 1 | 2 | 2 | 29% |", "| 5 | 2 | 1 | 14% |"]
    table = mislabel_markdown(report)
    assert "score (el2n_window)" in table and "Ranked by `el2n_window`" in table
    assert "No training signals" in mislabel_markdown(plain)
