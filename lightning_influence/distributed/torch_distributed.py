"""Collectives over a plain ``torch.distributed`` process group (a ``torchrun`` script, no Lightning)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


class TorchDistributed:
    """:class:`~lightning_influence.distributed.Collectives` on an initialised ``torch.distributed`` group.

    A collective that a failed rank never joins raises after the group's timeout (``init_process_group(timeout=)``)
    instead of hanging.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "Expected an initialised torch.distributed process group, but none is. Call"
                " `torch.distributed.init_process_group(...)` first, or use `SingleProcess()`."
            )
        self.group = group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)
