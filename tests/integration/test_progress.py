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
