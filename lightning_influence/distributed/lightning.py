"""Collectives through the Lightning trainer's strategy (DDP, DDP-spawn, FSDP-free data parallel)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import Strategy


class StrategyCollectives:
    """:class:`~lightning_influence.distributed.Collectives` via ``strategy.reduce/broadcast/barrier``.

    Object gathering is one ``broadcast`` per rank, so everything goes through the strategy (and its timeout,
    e.g. ``DDPStrategy(timeout=timedelta(minutes=5))``).
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy: Any = strategy  # a parallel strategy: rank and world size are not on the base class

    @property
    def rank(self) -> int:
        return self.strategy.global_rank

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.reduce(tensor.clone(), reduce_op="sum")

    def gather_objects(self, obj: Any) -> list[Any]:
        return [self.strategy.broadcast(obj if source == self.rank else None, src=source)
                for source in range(self.world_size)]

    def barrier(self) -> None:
        self.strategy.barrier("lightning_influence")
