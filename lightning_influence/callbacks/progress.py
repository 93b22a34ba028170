"""Progress that moves: the trainer's own progress bar (rich or tqdm) during long influence steps, and plain log
lines with the rate and the time left when the output is not a terminal (a log file, CI)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

#: Seconds between two plain progress lines when the output is not a terminal.
LOG_EVERY_SECONDS = 15.0
#: Seconds between two redraws of a rich task.
REFRESH_SECONDS = 0.2

Advance = Callable[[int], None]


@contextlib.contextmanager
def progress_task(trainer: pl.Trainer, description: str, total: Optional[int]) -> Iterator[Advance]:
    """Yield ``advance(n)`` for a task of ``total`` units (None: unknown), shown like the trainer's own bar.

    With Lightning's ``RichProgressBar`` the task joins its live display (a second live display would never
    redraw); with ``TQDMProgressBar`` it is a tqdm bar. When standard error is not a terminal, a line with the
    count, rate and time left is logged every :data:`LOG_EVERY_SECONDS` instead. Silent off rank zero, without
    a progress bar, and for empty tasks.
    """
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or bar is None or (total is not None and total <= 0):
        yield _ignore
        return
    if not _is_terminal():
        yield _log_lines(description, total)
        return
    if isinstance(bar, RichProgressBar):
        live = getattr(bar, "progress", None)
        if live is not None and not getattr(bar, "_progress_stopped", False):
            with _rich_task(live, description, total) as advance:  # join the bar's running display
                yield advance
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as own, _rich_task(own, description, total) as advance:
            yield advance
        return
    if isinstance(bar, TQDMProgressBar):
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, mininterval=0.5) as meter:

            def advance(n: int = 1) -> None:
                meter.update(n)

            yield advance
        return
    yield _log_lines(description, total)


def _ignore(n: int = 1) -> None:
    return None


def _is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextlib.contextmanager
def _rich_task(progress: Any, description: str, total: Optional[int]) -> Iterator[Advance]:
    task = progress.add_task(description, total=total)
    last = [0.0]

    def advance(n: int = 1) -> None:
        progress.update(task, advance=n)
        if time.monotonic() - last[0] > REFRESH_SECONDS:  # Lightning's live display refreshes on its own events only
            last[0] = time.monotonic()
            progress.refresh()

    try:
        yield advance
    finally:
        progress.remove_task(task)


def _log_lines(description: str, total: Optional[int]) -> Advance:
    """``advance(n)`` that logs ``description: done/total (rate/s, elapsed, ETA)`` at most every few seconds."""
    start = time.monotonic()
    state = {"done": 0, "logged": start}

    def advance(n: int = 1) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["logged"] < LOG_EVERY_SECONDS:
            return
        state["logged"] = now
        elapsed = now - start
        rate = state["done"] / elapsed if elapsed > 0 else 0.0
        of = f"/{total}" if total else ""
        eta = f", about {(total - state['done']) / rate:.0f} s left" if total and rate > 0 else ""
        rank_zero_info(f"{description}: {state['done']}{of} ({rate:.1f}/s, {elapsed:.0f} s elapsed{eta})")

    return advance
