"""Tests of the reporting layer: TensorBoard events, markdown, JSON/tensor files, console and images."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_influence.reporting import (
    SIGN_CONVENTION,
    ExplainedPoint,
    Influencer,
    InfluenceReport,
    SolverSummary,
    influence_grid_figure,
    load_full_scores,
    looks_like_image,
    point_markdown,
    print_summary,
    report_markdown,
    report_to_dict,
    save_tensor_atomic,
    write_json_atomic,
    write_report,
    write_report_files,
    write_score_index,
    write_score_shard,
)
from lightning_influence.reporting.tensorboard import MAX_TRACE_POINTS, subsample_steps

VAL_INDICES = (7, 42)
STEPS = 50
TEXT = "/text_summary"  # torch's SummaryWriter.add_text appends this to every text tag
SIZE_GUIDANCE = {"images": 0, "scalars": 0, "tensors": 0, "histograms": 0}


def make_report(input_shape: tuple[int, ...] = (1, 8, 8), steps: int = STEPS) -> InfluenceReport:
    """Two points with 3 harmful + 3 helpful each; trace ``[2, steps]`` with NaN padding in row 1."""
    generator = torch.Generator().manual_seed(0)

    def example() -> torch.Tensor:
        return torch.rand(input_shape, generator=generator)

    points = []
    for p, val_index in enumerate(VAL_INDICES):
        harmful = tuple(
            Influencer(
                100 * (p + 1) + k,
                0.3 / (k + 1),
                label=k,
                prediction=torch.tensor(k + 1),
                loss=0.5,
                input=example(),
            )
            for k in range(3)
        )
        helpful = tuple(
            Influencer(
                100 * (p + 1) + 50 + k, -0.2 / (k + 1), label=torch.tensor(k), prediction=k, input=example()
            )
            for k in range(3)
        )
        scores = torch.randn(300, generator=generator, dtype=torch.float64)
        points.append(
            ExplainedPoint(
                val_index,
                torch.tensor(p + 3),
                8 - p,
                1.25 + p,
                harmful,
                helpful,
                scores=scores,
                input=example(),
            )
        )
    trace = torch.rand(2, steps, generator=generator)
    trace[1, steps - 10 :] = float("nan")
    solver = SolverSummary(
        "lissa", 1e-2, True, 3.5, scale=25.0, settings={"depth": steps, "repeats": 2}, trace=trace
    )
    timings = {"s_test": 3.5, "scoring": 1.25, "self influence": 0.5}
    return InfluenceReport(3, 120, "validation", 1000, tuple(points), solver, timings)


def read_events(directory: Path) -> EventAccumulator:
    (event_file,) = directory.glob("events.out.tfevents.*")
    return EventAccumulator(str(event_file), size_guidance=SIZE_GUIDANCE).Reload()


def write_events(directory: Path, report: InfluenceReport) -> EventAccumulator:
    writer = SummaryWriter(log_dir=str(directory))
    write_report(writer, report)
    writer.close()
    return read_events(directory)


def text_of(events: EventAccumulator, tag: str) -> str:
    (event,) = events.Tensors(tag + TEXT)
    return event.tensor_proto.string_val[0].decode()


def test_tensorboard_tags_and_counts(tmp_path: Path) -> None:
    report = make_report()
    events = write_events(tmp_path, report)
    tags = events.Tags()
    assert sorted(tags["images"]) == sorted(f"influence/val_{i}/examples" for i in VAL_INDICES)
    for i, point in zip(VAL_INDICES, report.points):
        assert events.Images(f"influence/val_{i}/examples")[0].step == report.global_step
        assert f"influence/val_{i}/table{TEXT}" in tags["tensors"]
        assert events.SummaryMetadata(f"influence/val_{i}/table{TEXT}").plugin_data.plugin_name == "text"
        table = text_of(events, f"influence/val_{i}/table")
        assert all(f"| {e.train_index} |" in table for e in (*point.harmful, *point.helpful))
        histogram = events.Histograms(f"influence/val_{i}/scores")
        assert len(histogram) == 1 and histogram[0].histogram_value.num == 300
    assert f"influence/summary{TEXT}" in tags["tensors"]
    assert "harmful" in text_of(events, "influence/summary")
    for tag_key, key in (("s_test", "s_test"), ("scoring", "scoring"), ("self_influence", "self influence")):
        (event,) = events.Scalars(f"influence/time/{tag_key}_seconds")
        assert event.step == report.global_step and event.value == pytest.approx(report.timings[key])
    (final,) = events.Scalars("influence/lissa/final_update")
    trace = report.solver.trace
    assert final.value == pytest.approx(max(float(trace[0, -1]), float(trace[1, STEPS - 11])))
    repeat_0 = events.Scalars(f"influence/lissa_trace/epoch_{report.epoch}/repeat_0")
    repeat_1 = events.Scalars(f"influence/lissa_trace/epoch_{report.epoch}/repeat_1")
    assert [e.step for e in repeat_0] == list(range(1, STEPS + 1))
    assert [e.step for e in repeat_1] == list(range(1, STEPS - 9))  # NaN padding skipped
    assert all(math.isfinite(e.value) for e in repeat_1)


def test_trace_is_subsampled(tmp_path: Path) -> None:
    steps = 1234
    events = write_events(tmp_path, make_report(steps=steps))
    for repeat, last_step in ((0, steps), (1, steps - 10)):
        logged = [e.step for e in events.Scalars(f"influence/lissa_trace/epoch_3/repeat_{repeat}")]
        assert len(logged) == MAX_TRACE_POINTS
        assert logged[0] == 1 and logged[-1] == last_step and logged == sorted(set(logged))


def test_a_lissa_solve_routed_to_cg_logs_cg_residuals_under_cg_tags(tmp_path: Path) -> None:
    report = make_report()
    residuals = torch.tensor([[0.5, 0.1, 0.008]])
    routed = replace(report.solver, trace=residuals, iterations=0,
                     settings={**report.solver.settings, "solved_by": "cg", "refined_iterations": 3})
    events = write_events(tmp_path, replace(report, solver=routed))
    logged = events.Scalars(f"influence/cg_trace/epoch_{report.epoch}/repeat_0")
    assert [(e.step, round(e.value, 6)) for e in logged] == [(1, 0.5), (2, 0.1), (3, 0.008)]
    assert events.Scalars("influence/cg/final_update")[0].value == pytest.approx(0.008)
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("influence/lissa")]


def test_subsample_steps_bounds() -> None:
    row = torch.arange(10.0)
    row[3] = float("nan")
    assert subsample_steps(row).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert subsample_steps(row, max_points=3).tolist() == [0, 5, 9]
    assert subsample_steps(torch.full((4,), float("nan"))).numel() == 0
    with pytest.raises(ValueError, match="Expected `max_points`"):
        subsample_steps(row, max_points=1)


def test_flat_inputs_give_tables_but_no_images(tmp_path: Path) -> None:
    events = write_events(tmp_path, make_report(input_shape=(64,)))
    tags = events.Tags()
    assert tags["images"] == []
    assert {f"influence/val_{i}/table{TEXT}" for i in VAL_INDICES} <= set(tags["tensors"])


def test_missing_influencer_input_skips_image(tmp_path: Path) -> None:
    report = make_report()
    first = report.points[0]
    stripped = replace(first, helpful=(replace(first.helpful[0], input=None), *first.helpful[1:]))
    events = write_events(tmp_path, replace(report, points=(stripped, report.points[1])))
    assert events.Tags()["images"] == [f"influence/val_{VAL_INDICES[1]}/examples"]


def test_report_without_points_or_trace(tmp_path: Path) -> None:
    report = make_report()
    empty = replace(report, points=(), solver=replace(report.solver, trace=None), timings={})
    events = write_events(tmp_path, empty)
    assert events.Tags()["tensors"] == [f"influence/summary{TEXT}"]
    assert events.Tags()["scalars"] == [] and events.Tags()["images"] == []
    assert "No monitored points" in text_of(events, "influence/summary")


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1, 8, 8), True),
        ((3, 32, 32), True),
        ((4, 5, 6), True),
        ((28, 28), True),
        ((2, 8, 8), False),
        ((64,), False),
        ((1, 3, 8), False),
        ((3, 8), False),
        ((8, 1, 8, 8), False),
        ((), False),
    ],
)
def test_looks_like_image(shape: tuple[int, ...], expected: bool) -> None:
    assert looks_like_image(torch.zeros(shape)) is expected


def test_grid_figure_captions_and_errors() -> None:
    point = make_report().points[0]
    figure = influence_grid_figure(point)
    texts = [ax.get_xlabel() for ax in figure.axes]
    assert len(texts) == 7 and texts[0].startswith(f"val #{point.val_index}")
    assert all(f"train #{i.train_index}" in " ".join(texts) for i in (*point.harmful, *point.helpful))
    assert "harmful" in texts[1] and "helpful" in texts[-1]
    figure.canvas.draw()
    with pytest.raises(ValueError, match="Expected `point.input`"):
        influence_grid_figure(replace(point, input=torch.zeros(64)))
    with pytest.raises(ValueError, match=r"Expected `point.helpful\[0\].input`.*but got None"):
        influence_grid_figure(replace(point, helpful=(replace(point.helpful[0], input=None),)))


def test_grid_tiles_are_normalised_for_each_layout() -> None:
    inputs = [
        torch.arange(64.0).reshape(8, 8) * 7 - 3,
        torch.rand(3, 8, 12),
        torch.rand(4, 6, 6),
        torch.ones(1, 5, 5),
    ]
    helpful = tuple(Influencer(i, -0.1, input=x) for i, x in enumerate(inputs[1:]))
    figure = influence_grid_figure(
        ExplainedPoint(0, "cat", "dog", 0.5, (), helpful, input=inputs[0]), max_columns=2
    )
    arrays = [ax.images[0].get_array() for ax in figure.axes]
    assert [a.shape for a in arrays] == [(8, 8), (8, 12, 3), (6, 6, 3), (5, 5)]
    assert all(a.min() >= 0 and a.max() <= 1 for a in arrays)
    assert arrays[0].min() == 0 and arrays[0].max() == 1
    position = [ax.get_position(original=True) for ax in figure.axes]
    assert position[1].y1 < position[0].y0  # the helpful group starts on a row of its own
    assert position[3].y1 < position[1].y0  # and wraps onto a second row of its own


def test_markdown_mentions_every_index() -> None:
    report = make_report()
    for point in report.points:
        text = point_markdown(point, report.solver)
        assert f"validation #{point.val_index}" in text.lower()
        assert "harmful #3" in text and "helpful #3" in text and "damping 0.01" in text
        for influencer in (*point.harmful, *point.helpful):
            assert f"| {influencer.train_index} |" in text
    summary = report_markdown(report)
    assert "harmful" in summary and "helpful" in summary and SIGN_CONVENTION in summary
    for point in report.points:
        assert f"#{point.harmful[0].train_index}" in summary and f"#{point.helpful[0].train_index}" in summary


def test_json_round_trip(tmp_path: Path) -> None:
    report = make_report()
    path = write_report_files(tmp_path / "out", report)
    assert path.name == "epoch=3.json"
    loaded = json.loads(path.read_text())
    assert loaded == report_to_dict(report)
    assert loaded["schema_version"] == 1 and loaded["sign_convention"] == SIGN_CONVENTION
    assert loaded["solver"] == {
        "solver": "lissa",
        "damping": 0.01,
        "scale": 25.0,
        "converged": True,
        "seconds": 3.5,
        "settings": {"depth": STEPS, "repeats": 2},
        # how the curvature and damping were chosen, and the residual check (unset in this hand-made record)
        "curvature": None, "damping_requested": None, "damping_rule": None, "eigenvalue_min": None,
        "eigenvalue_max": None, "residual": None, "residual_tol": None, "retries": [], "warnings": [],
    }
    for record, entry in zip(report.points, loaded["points"]):
        assert entry["val_index"] == record.val_index and entry["label"] == int(record.label)
        assert entry["prediction"] == record.prediction and entry["loss"] == record.loss
        assert entry["harmful"] == [[i.train_index, i.influence] for i in record.harmful]
        assert entry["helpful"] == [[i.train_index, i.influence] for i in record.helpful]
    assert sorted(p.name for p in path.parent.iterdir()) == ["epoch=3.json"]


def test_json_non_finite_becomes_null(tmp_path: Path) -> None:
    report = make_report()
    point = replace(report.points[0], loss=float("nan"), label="cat|dog")
    loaded = json.loads(write_report_files(tmp_path, replace(report, points=(point,))).read_text())
    assert loaded["points"][0]["loss"] is None and loaded["points"][0]["label"] == "cat|dog"


def test_full_scores_file(tmp_path: Path) -> None:
    report = make_report()
    scores = torch.randn(2, report.train_size)
    write_report_files(tmp_path, report, full_scores=scores)
    saved = torch.load(tmp_path / "epoch=3-scores-rank0.pt", weights_only=True)
    assert saved["val_indices"].tolist() == list(VAL_INDICES)
    assert torch.equal(saved["scores"], scores)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=3-scores-rank0.pt", "epoch=3-scores.json", "epoch=3.json"]
    val_indices, loaded = load_full_scores(tmp_path / "epoch=3-scores.json")
    assert val_indices == list(VAL_INDICES) and torch.equal(loaded, scores.double())
    with pytest.raises(ValueError, match="Expected `full_scores`"):
        write_report_files(tmp_path, report, full_scores=torch.randn(3, 10))


def test_score_shards_from_several_ranks_reassemble(tmp_path: Path) -> None:
    full = torch.randn(2, 11, dtype=torch.float64)
    world = 3
    for rank in range(world):
        columns = torch.arange(rank, 11, world)
        write_score_shard(tmp_path, 5, list(VAL_INDICES), columns, full[:, columns], rank, world)
    write_score_index(tmp_path, 5, list(VAL_INDICES), 11, world)
    val_indices, loaded = load_full_scores(tmp_path / "epoch=5-scores.json")
    assert val_indices == list(VAL_INDICES) and torch.equal(loaded, full)
    # a shard that scored a subset leaves the rest NaN (absent, not zero)
    write_score_shard(tmp_path, 6, list(VAL_INDICES), torch.tensor([4, 2]), full[:, [4, 2]], 0, 1)
    write_score_index(tmp_path, 6, list(VAL_INDICES), 11, 1)
    _, partial = load_full_scores(tmp_path / "epoch=6-scores.json")
    assert torch.equal(partial[:, [4, 2]], full[:, [4, 2]]) and int(partial.isnan().sum()) == 2 * 9
    (tmp_path / "epoch=5-scores-rank1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rank1.pt listed in"):
        load_full_scores(tmp_path / "epoch=5-scores.json")
    write_score_shard(tmp_path, 5, list(VAL_INDICES), torch.tensor([0, 1]), full[:, :2], 1, world)
    with pytest.raises(ValueError, match="repeats training examples"):
        load_full_scores(tmp_path / "epoch=5-scores.json")


def test_atomic_writes_leave_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    write_json_atomic(target, {"x": 1})
    write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    with pytest.raises(ValueError):
        write_json_atomic(target, {"x": float("nan")})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "a" / "y.json", {"x": object()})
    save_tensor_atomic(tmp_path / "a" / "t.pt", torch.arange(3))
    assert torch.equal(torch.load(tmp_path / "a" / "t.pt", weights_only=True), torch.arange(3))
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["a/b/x.json", "a/t.pt"]


def test_console_summary() -> None:
    report = make_report()
    buffer = io.StringIO()
    print_summary(report, console=Console(file=buffer, width=160))
    text = buffer.getvalue()
    for point in report.points:
        assert str(point.val_index) in text
        assert f"#{point.harmful[0].train_index}" in text and f"#{point.helpful[0].train_index}" in text
    assert "lissa" in text and "harmful" in text


def test_example_texts_get_a_column_in_the_tables_and_an_entry_in_the_json():
    from lightning_influence.reporting.examples import report_examples
    from lightning_influence.results import ExplainedPoint, Influencer, InfluenceReport, SolveInfo

    harmful = (Influencer(3, 0.5, label=1, prediction=1, loss=0.1, text="the BIG cat"),)
    point = ExplainedPoint(7, 0, 1, 2.0, harmful, (), text="a SMALL dog")
    report = InfluenceReport(1, 10, "fit_end", 20, (point,), SolveInfo("cg", 0.1, True, 1.0))
    table = point_markdown(point, report.solver)
    assert "| example |" in table and "a SMALL dog" in table and "the BIG cat" in table
    examples = report_examples(report)
    assert examples["val"]["7"]["text"] == "a SMALL dog" and examples["train"]["3"]["text"] == "the BIG cat"
    plain = point_markdown(ExplainedPoint(7, 0, 1, 2.0, (), ()), report.solver)
    assert "example" not in plain.splitlines()[4]  # no column when no formatter was given
