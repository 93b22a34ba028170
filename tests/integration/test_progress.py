"""Long influence steps show progress while they run, not after."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest

from lightning_influence.callbacks import progress


@pytest.fixture
def trainer():
    from lightning.pytorch.callbacks import TQDMProgressBar

    return pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                      callbacks=[TQDMProgressBar()])


def test_plain_lines_are_logged_during_the_task_when_output_is_not_a_terminal(trainer, monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "_is_terminal", lambda: False)
    seen_during = []
    with caplog.at_level(logging.INFO), progress.progress_task(trainer, "influence: s_test", 10) as advance:
        for _ in range(10):
            advance(1)
            seen_during.append(sum("influence: s_test" in r.getMessage() for r in caplog.records))
    assert seen_during[0] >= 1 and seen_during == sorted(seen_during) and seen_during[-1] >= 5
    last = [r.getMessage() for r in caplog.records if "influence: s_test" in r.getMessage()][-1]
    assert "10/10" in last and "/s" in last and "elapsed" in last


def test_a_terminal_with_tqdm_gets_a_bar_that_counts_every_step(trainer, monkeypatch):
    import tqdm.auto

    class Recording:  # stands for tqdm: records each update as it happens
        updates: list[int] = []

        def __init__(self, total, **kwargs):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def update(self, n):
            Recording.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    monkeypatch.setattr(progress, "_is_terminal", lambda: True)
    seen = []
    with progress.progress_task(trainer, "influence: scoring", 5) as advance:
        for _ in range(5):
            advance(1)
            seen.append(len(Recording.updates))
    assert seen == [1, 2, 3, 4, 5]


def test_off_rank_zero_or_without_a_bar_nothing_is_shown():
    quiet = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    with progress.progress_task(quiet, "influence: s_test", 3) as advance:
        assert advance is progress._ignore


def test_rates_count_from_the_tasks_first_unit_not_from_when_it_was_opened(monkeypatch):
    """#27: a scoring task opened with the s_test task reported minutes per chunk for chunks of a tenth of a second."""
    import time

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    lines: list[str] = []
    with progress.log_lines("influence: scoring", 1300, emit=lines.append) as advance:
        now[0] += 275.0  # the s_test phase before it
        advance(256)  # the first chunk: the rate starts here
        for _ in range(4):
            now[0] += 0.1
            advance(256)
    assert lines[0] == "influence: scoring: 256/1300"
    assert lines[-1].startswith("influence: scoring: 1280/1300 (2560.0/s, 0.5 s elapsed")


def test_work_before_the_first_unit_is_shown_while_it_runs(monkeypatch):
    import time

    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.05)
    lines: list[str] = []
    with progress.log_lines("mislabel: self-influence", 10, "top 64 curvature eigenpairs (Lanczos)",
                            emit=lines.append) as advance:
        time.sleep(0.3)  # Lanczos: no unit of the task yet
        seen_before = list(lines)
        advance(10)
    assert seen_before and all("Lanczos" in line and "s elapsed" in line for line in seen_before)

    from rich.progress import Progress

    display = Progress()
    with progress.rich_task(display, "mislabel: self-influence", 10, "Lanczos") as advance:
        assert [t.description for t in display.tasks] == ["mislabel: self-influence", "mislabel: self-influence: Lanczos"]
        assert not display.tasks[0].started
        advance(4)
        assert [t.description for t in display.tasks] == ["mislabel: self-influence"] and display.tasks[0].started
        assert display.tasks[0].completed == 4
    assert not display.tasks


def test_correct_rounds_count_from_the_start_of_the_run(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "rank_zero_info", lines.append)
    monkeypatch.setattr(progress, "_is_terminal", lambda: False)
    with progress.kind_task("tqdm", "correct: rounds", 3, from_open=True) as advance:
        advance(1)
    assert lines[-1].startswith("correct: rounds: 1/3 (") and "left" in lines[-1]
    with progress.kind_task(None, "correct: rounds", 3) as advance:
        assert advance is progress._ignore
