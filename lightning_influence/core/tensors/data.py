"""Indexed access to a map-style dataset: fixed-order loaders over index lists, and collated fetches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate

from lightning_influence.core.tensors.batching import batch_size_of


@dataclass(frozen=True)
class IndexedData:
    """A map-style dataset read in a fixed order, so every score can be tied to a dataset index.

    Args:
        dataset: the user's dataset (indices reported are indices into it).
        collate_fn: how the user's loader collates examples (default: torch's ``default_collate``).
        batch_size: examples per batch when iterating.
    """

    dataset: Dataset
    collate_fn: Optional[Callable[[list[Any]], Any]] = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.dataset, IterableDataset) or not hasattr(self.dataset, "__getitem__"):
            raise TypeError(
                f"Expected a map-style dataset (with __len__ and __getitem__) so training examples can be identified"
                f" by index, but got {type(self.dataset).__name__}. Pass `train_dataset=` a map-style dataset (e.g."
                " a TensorDataset of the same data)."
            )

    @classmethod
    def from_loader(cls, loader: DataLoader, batch_size: int | None = None) -> IndexedData:
        """The dataset and collate function of a user's DataLoader (its sampler and shuffling are ignored)."""
        return cls(loader.dataset, loader.collate_fn, batch_size or loader.batch_size or 256)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def loader(self, indices: Sequence[int] | None = None) -> DataLoader:
        """Sequential loader over ``indices`` (default all), in that order, without padding or duplicates."""
        source = self.dataset if indices is None else Subset(self.dataset, list(indices))
        return DataLoader(source, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn or default_collate)

    def fetch(self, indices: Sequence[int]) -> Any:
        """The examples ``indices`` collated into one batch."""
        collate = self.collate_fn or default_collate
        return collate([self.dataset[int(i)] for i in indices])

    def batches_with_indices(self, indices: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, Any]]:
        """``(dataset_indices, batch)`` pairs in order. A ``TensorDataset`` (or a ``Subset`` of one) under the
        default collate is sliced a batch at a time: the tensors ``default_collate`` would stack, without fetching
        and stacking example by example (on a small model most of a pass's time otherwise)."""
        order = torch.arange(len(self)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        tensors, rows = _sliceable(self.dataset, self.collate_fn)
        if tensors is not None:
            for chunk in order.split(self.batch_size):
                where = chunk if rows is None else rows[chunk]
                yield chunk, [tensor[where] for tensor in tensors]  # a list, as default_collate gives a tuple's fields
            return
        start = 0
        for batch in self.loader(indices):
            size = batch_size_of(batch)
            yield order[start : start + size], batch
            start += size


def _sliceable(dataset: Any, collate_fn: Optional[Callable[[list[Any]], Any]]
               ) -> tuple[Optional[tuple[torch.Tensor, ...]], Optional[torch.Tensor]]:
    """The tensors of a ``TensorDataset`` under the default collate, seen through any ``Subset`` around it, and the
    rows of them that the outer dataset's indices map to (None: the same indices); ``(None, None)`` otherwise."""
    if collate_fn not in (None, default_collate):
        return None, None
    rows: Optional[torch.Tensor] = None
    while isinstance(dataset, Subset):
        outer = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        rows = outer if rows is None else outer[rows]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorDataset):
        return None, None
    return dataset.tensors, rows


def subset_batches(loader: Iterable[Any], examples: int | None, seed: int, least_batch_size: int = 0) -> Iterator[Any]:
    """A fixed seeded subset of ``examples`` examples of ``loader``'s map-style dataset (all of it when None or
    at least its size), in batches of the loader's size or ``least_batch_size`` if larger: fewer, larger
    curvature products cost less per example (LiSSA already holds products of its own ``batch_size``). Any
    other iterable of batches is read whole, as it comes."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        yield from loader
        return
    size = max(loader.batch_size or 1, least_batch_size)
    chosen = subset_indices(len(loader.dataset), examples, seed)  # type: ignore[arg-type]
    if len(chosen) == len(loader.dataset) and size == loader.batch_size and isinstance(loader.sampler, SequentialSampler):  # type: ignore[arg-type]
        yield from loader
        return
    yield from DataLoader(Subset(loader.dataset, chosen), batch_size=size, collate_fn=loader.collate_fn)


def subset_indices(n: int, examples: int | None, seed: int) -> list[int]:
    """The dataset indices of :func:`subset_batches`: all ``n`` in order, or ``examples`` of them by a seeded shuffle."""
    if examples is None or examples >= n:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:examples].tolist()
