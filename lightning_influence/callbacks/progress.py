"""Progress display that follows the trainer's choice of progress bar (rich, tqdm, or none)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


@contextlib.contextmanager
def progress_task(trainer: pl.Trainer, description: str, total: Optional[int]) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` for a bar of ``total`` units, drawn like the trainer's own bar (silent if off).

    ``total=None``: the amount is not known in advance (a counter without an end).
    """
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or bar is None or (total is not None and total <= 0):
        yield lambda n=1: None
    elif isinstance(bar, RichProgressBar):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)
    elif isinstance(bar, TQDMProgressBar):
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=description, leave=False, dynamic_ncols=True) as meter:
            yield lambda n=1: meter.update(n)
    else:
        yield lambda n=1: None
