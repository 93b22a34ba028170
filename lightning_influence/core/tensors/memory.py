"""How much memory an analysis may take for an optional cache: a share of what the device has free right now.

A fixed cap (a number of floats) is too small on a large machine and too large on a small one; the free memory
of the device the tensors live on is what decides whether a cache fits. On CUDA that is
``torch.cuda.mem_get_info``; on the CPU the available physical memory (``psutil`` when installed, else
``os.sysconf``), lowered to what the process's cgroup (a container's limit) still allows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: cgroup v2 files of the memory limit and the current use (absent outside a container or under cgroup v1).
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")
CGROUP_USAGE = Path("/sys/fs/cgroup/memory.current")


def free_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes the device can still hand out: free CUDA memory, or the available host memory (cgroup-limited)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _host_available()
    cgroup = _cgroup_headroom()
    return available if cgroup is None else min(available, cgroup)


def memory_budget(device: torch.device | str, fraction: float, element_size: int = 4) -> int:
    """How many numbers of ``element_size`` bytes fit in ``fraction`` of the device's free memory.

    Example:
        >>> memory_budget("cpu", 0.0)
        0
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"Expected `fraction` to be in [0, 1], but got {fraction!r}.")
    return int(fraction * free_memory_bytes(device)) // max(int(element_size), 1)


def _host_available() -> int:
    try:
        import psutil
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


def _cgroup_headroom() -> int | None:
    """The cgroup's limit minus its current use, or None without a readable numeric limit."""
    try:
        limit = CGROUP_LIMIT.read_text().strip()
        usage = int(CGROUP_USAGE.read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit():  # "max": no limit
        return None
    return max(int(limit) - usage, 0)


#: Most bytes of per-example gradients (``chunk x P`` numbers) held at once, whatever the machine: 64 MiB. On a
#: 1M-parameter model that is 16 examples a chunk; the budget also stays under a sixteenth of the free memory.
PER_EXAMPLE_BYTES = 64 * 2**20


def per_example_chunk(num_params: int, requested: int, device: torch.device | str = "cpu", element_size: int = 4,
                      budget_bytes: int | None = None) -> int:
    """Examples whose per-example gradients (``chunk x num_params`` numbers of ``element_size`` bytes) fit the
    budget: ``budget_bytes`` (default :data:`PER_EXAMPLE_BYTES`, lowered to a sixteenth of the device's free
    memory), at least one example and at most ``requested``.

    Example:
        >>> per_example_chunk(1_000_000, 256, budget_bytes=64 * 2**20)
        16
    """
    budget = PER_EXAMPLE_BYTES if budget_bytes is None else int(budget_bytes)
    if budget_bytes is None:
        budget = min(budget, free_memory_bytes(device) // 16)
    per_example = max(int(num_params), 1) * max(int(element_size), 1)
    return max(1, min(int(requested), budget // per_example))
