"""Progress that moves: the trainer's own progress bar (rich or tqdm) during long influence steps, and plain log
lines with the rate and the time left when the output is not a terminal (a log file, CI).

Every task counts its rate and time from its own first unit, not from when it was opened: tasks of one analysis
are opened together, and a scoring phase that starts after minutes of s_test must not report minutes per
chunk. Work that runs before a task's first unit and has no count of its own (the Lanczos eigenpairs of
``damping="auto"`` and of the mislabel ranking, the LiSSA scale estimate) is shown as its ``waiting`` label:
a pulsing bar with its elapsed time on a terminal, a line every :data:`LOG_EVERY_SECONDS` otherwise.
"""

from __future__ import annotations

import contextlib
import sys
import threading
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
def progress_task(trainer: pl.Trainer, description: str, total: Optional[int],
                  waiting: Optional[str] = None) -> Iterator[Advance]:
    """Yield ``advance(n)`` for a task of ``total`` units (None: unknown), shown like the trainer's own bar.

    With Lightning's ``RichProgressBar`` the task joins its live display (a second live display would never
    redraw); with ``TQDMProgressBar`` it is a tqdm bar opened at the first unit. When standard error is not a
    terminal, a line with the count, rate and time left is logged every :data:`LOG_EVERY_SECONDS` instead.
    ``waiting`` names the work before the first unit (shown while it runs). Silent off rank zero, without a
    progress bar, and for empty tasks.
    """
    bar = trainer.progress_bar_callback
    live = getattr(bar, "progress", None) if isinstance(bar, RichProgressBar) else None
    if (trainer.is_global_zero and live is not None and _is_terminal()
            and not getattr(bar, "_progress_stopped", False) and not (total is not None and total <= 0)):
        with rich_task(live, description, total, waiting) as advance:  # join the bar's running display
            yield advance
        return
    with kind_task(bar_kind(trainer), description, total, waiting) as advance:
        yield advance


def bar_kind(trainer: pl.Trainer) -> Optional[str]:
    """``"rich"``, ``"tqdm"``, ``"plain"`` (another bar) or None (no bar, or not rank zero): how to show progress."""
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or bar is None:
        return None
    return "rich" if isinstance(bar, RichProgressBar) else "tqdm" if isinstance(bar, TQDMProgressBar) else "plain"


@contextlib.contextmanager
def kind_task(kind: Optional[str], description: str, total: Optional[int], waiting: Optional[str] = None,
              from_open: bool = False) -> Iterator[Advance]:
    """A task shown in the way ``kind`` (:func:`bar_kind`) names, in its own display; ``from_open``: the work
    starts now (the rate counts from here, not from the first unit)."""
    if kind is None or (total is not None and total <= 0):
        yield _ignore
    elif not _is_terminal() or kind == "plain":
        with log_lines(description, total, waiting, rank_zero_info, from_open) as advance:
            yield advance
    elif kind == "rich":
        with own_rich_progress() as own, rich_task(own, description, total, waiting, from_open) as advance:
            yield advance
    else:
        with _tqdm_task(description, total, from_open) as advance:
            yield advance


def _ignore(n: int = 1) -> None:
    return None


def _is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def own_rich_progress(console: Any = None) -> Any:
    """A transient rich display: description, bar (pulsing until the first unit), count, rate, elapsed time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)


@contextlib.contextmanager
def rich_task(progress: Any, description: str, total: Optional[int], waiting: Optional[str] = None,
              from_open: bool = False) -> Iterator[Advance]:
    """A task of ``progress`` whose clock starts at its first unit (``from_open``: now); until then a pulsing
    ``waiting`` task runs."""
    task = progress.add_task(description, total=total, start=from_open)
    before = progress.add_task(f"{description}: {waiting}", total=None) if waiting else None
    last = [0.0]

    def advance(n: int = 1) -> None:
        if not progress.tasks[_position(progress, task)].started:
            if before is not None:
                progress.remove_task(before)
            progress.start_task(task)
        progress.update(task, advance=n)
        if time.monotonic() - last[0] > REFRESH_SECONDS:  # Lightning's live display refreshes on its own events only
            last[0] = time.monotonic()
            progress.refresh()

    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(progress, stop), daemon=True)  # the pulse and clock move on their own
    ticker.start()
    try:
        yield advance
    finally:
        stop.set()
        ticker.join()
        for t in (task, before):
            with contextlib.suppress(KeyError, IndexError):
                if t is not None and any(x.id == t for x in progress.tasks):
                    progress.remove_task(t)


def _position(progress: Any, task: Any) -> int:
    return next(i for i, t in enumerate(progress.tasks) if t.id == task)


def _tick(progress: Any, stop: threading.Event) -> None:
    while not stop.wait(REFRESH_SECONDS * 2):
        with contextlib.suppress(Exception):
            progress.refresh()


@contextlib.contextmanager
def _tqdm_task(description: str, total: Optional[int], from_open: bool = False) -> Iterator[Advance]:
    """A tqdm bar opened at the first unit (``from_open``: now), so its rate is the task's own."""
    from tqdm.auto import tqdm

    meter: list[Any] = []
    if from_open:
        meter.append(tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, mininterval=0.5))

    def advance(n: int = 1) -> None:
        if not meter:
            meter.append(tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, mininterval=0.5))
        meter[0].update(n)

    try:
        yield advance
    finally:
        if meter:
            meter[0].close()


@contextlib.contextmanager
def log_lines(description: str, total: Optional[int], waiting: Optional[str] = None,
              emit: Callable[[str], None] = print, from_open: bool = False) -> Iterator[Advance]:
    """``advance(n)`` that emits ``description: done/total (rate/s, elapsed, time left)`` at most every
    :data:`LOG_EVERY_SECONDS`, the rate counted from the task's first unit (``from_open``: from now); while
    ``waiting`` runs (before the first unit) a line with its elapsed time every :data:`LOG_EVERY_SECONDS`."""
    opened = time.monotonic()
    state: dict[str, Any] = {"done": 0, "first": opened if from_open else None, "first_units": 0, "logged": opened}
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(max(LOG_EVERY_SECONDS, 0.05)):
            if state["first"] is None:
                emit(f"{description}: {waiting}, {time.monotonic() - opened:.0f} s elapsed")

    beat = threading.Thread(target=heartbeat, daemon=True) if waiting else None
    if beat is not None:
        beat.start()

    def advance(n: int = 1) -> None:
        now = time.monotonic()
        state["done"] += n
        if state["first"] is None:
            state["first"], state["first_units"] = now, n
        if now - state["logged"] < LOG_EVERY_SECONDS:
            return
        state["logged"] = now
        emit(_line(description, total, state["done"], state["done"] - state["first_units"], now - state["first"]))

    try:
        yield advance
    finally:
        stop.set()
        if beat is not None:
            beat.join()


def _line(description: str, total: Optional[int], done: int, counted: int, seconds: float) -> str:
    """The progress line; the rate is of the ``counted`` units after the first advance, over ``seconds``."""
    of = f"/{total}" if total else ""
    if counted <= 0 or seconds <= 0:
        return f"{description}: {done}{of}"
    rate = counted / seconds
    elapsed = seconds + (done - counted) / rate  # the first advance's units took about as long as the others
    left = f", about {(total - done) / rate:.0f} s left" if total else ""
    return f"{description}: {done}{of} ({_rate(rate)}, {_seconds(elapsed)} elapsed{left})"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def _rate(rate: float) -> str:
    return f"{rate:.1f}/s" if rate >= 0.1 else f"{1 / rate:.1f} s each"
