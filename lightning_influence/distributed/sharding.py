"""Splitting work over ranks: disjoint shards without padding, and a gather that carries failures to every rank."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

from lightning_influence.distributed.collectives import Collectives

T = TypeVar("T")


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Every ``world_size``-th index starting at ``rank``: disjoint shards that cover all, no padding."""
    return list(indices)[rank::world_size]


def block_shard(n: int, block: int, rank: int, world_size: int) -> list[int]:
    """Indices of the fixed blocks ``[b * block, (b + 1) * block)`` with ``b = rank (mod world_size)``.

    Every example lands in the same block whatever the world size, so batch-dependent float results (features
    of a batch) are identical on any number of ranks.
    """
    return [i for start in range(rank * block, n, world_size * block) for i in range(start, min(start + block, n))]


def gather_checked(
    collectives: Collectives, compute: Callable[[], T], share: Callable[[T], Any] = lambda value: value
) -> tuple[T, list[Any]]:
    """``compute()`` on this rank and every rank's ``share(result)`` in rank order; if any rank raised, all raise.

    A rank failing alone (a diverging LiSSA repeat, an out-of-memory error, a bad example in its shard) would
    leave the others blocked in the next collective until the process group's timeout, and the group broken
    afterwards. Each local step is therefore followed by this gather, which carries the failure to every rank.
    """
    error: Optional[BaseException] = None
    try:
        result: Any = compute()
        outcome: tuple[Any, Optional[str]] = (share(result), None)
    except Exception as err:  # noqa: BLE001 - re-raised below on this rank, reported on the others
        error, result = err, None
        outcome = (None, f"{type(err).__name__}: {err}")
    gathered = collectives.gather_objects(outcome)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (_, message) in enumerate(gathered) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"The influence analysis failed on rank {rank}, so every rank stops: {message}")
    return result, [value for value, _ in gathered]
