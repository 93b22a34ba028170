"""How many CPU threads a post-hoc command gives torch (``--threads``).

The command runs in its own process, so it may choose: ``auto`` (the default) is one thread per usable core
(``os.sched_getaffinity``) that the machine's load leaves idle, at least one. On a shared or busy machine
torch's own default (one thread per core) oversubscribes the cores, and OpenMP's waiting threads then make
the small operations of an influence analysis several times slower (``benchmarks/cli_threads.py`` measures
it; ``docs/cli.md`` quotes its results). An explicit ``--threads N`` (or ``OMP_NUM_THREADS``) is used as given.
"""

from __future__ import annotations

import os
from typing import Optional, Union

AUTO = "auto"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def idle_cores(cores: int, load: Optional[float]) -> int:
    """Cores of ``cores`` that a 1-minute load average of ``load`` leaves free (at least 1)."""
    if load is None:
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def parse_threads(text: str) -> Union[int, str]:
    """``--threads``: a positive int or ``auto``."""
    if text == AUTO:
        return AUTO
    value = int(text)
    if value < 1:
        raise ValueError(f"Expected `--threads` to be a positive int or 'auto', but got {text!r}.")
    return value


def choose_threads(requested: Union[int, str, None], environ: Optional[dict[str, str]] = None,
                   load: Optional[float] = None) -> tuple[int, str]:
    """``(threads, why)``: ``requested`` when a number, else ``OMP_NUM_THREADS`` when set, else the idle cores."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    if isinstance(requested, int):
        return requested, "--threads"
    omp = (environ or {}).get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    if load is None and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
    cores = usable_cores()
    return idle_cores(cores, load), f"auto: {cores} usable core(s), load {load if load is not None else 'unknown'}"


def apply_threads(requested: Union[int, str, None]) -> int:
    """Set torch's intra-op threads as :func:`choose_threads` says; returns the number."""
    import torch

    threads, _ = choose_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
