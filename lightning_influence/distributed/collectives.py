"""The few collectives the analysis needs, behind one protocol.

:class:`SingleProcess` is the identity; the distributed implementations (torch.distributed, the Lightning
strategy) provide the same methods, so the analysis code never branches on the number of processes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Collectives(Protocol):
    """What the analysis needs from the process group."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (every rank gets the result)."""
        ...

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (every rank gets the list)."""
        ...

    def barrier(self) -> None: ...


class SingleProcess:
    """Collectives of a process group of one."""

    rank = 0
    world_size = 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None
