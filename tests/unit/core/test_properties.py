"""Property-based tests (hypothesis) of the index bookkeeping: streaming top-k, the cross-shard merge, and the
dataset indices attached to every batch (sharding itself: test_distributed.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from lightning_influence.core.scoring import StreamingTopK, merge_top_influences, top_influences_of
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.sharding import shard


def _distinct_scores(seed: int, k: int, n: int) -> torch.Tensor:
    """``[k, n]`` scores without ties (each row a shuffled, shifted range), so the top-k is unique."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=generator).double() - n / 2 for _ in range(k)])


def _cuts(draw, n: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=6))) | {0, n})


@st.composite
def problems(draw):
    n = draw(st.integers(1, 60))
    return n, draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(0, 10_000)), _cuts(draw, n)


def _assert_equal_top(top, expected) -> None:
    for name in ("harmful_indices", "harmful_scores", "helpful_indices", "helpful_scores"):
        assert torch.equal(getattr(top, name), getattr(expected, name)), name


@settings(max_examples=150, deadline=None)
@given(problems())
def test_streaming_top_k_over_any_block_split_equals_a_full_sort(problem):
    n, k, m, seed, cuts = problem
    scores = _distinct_scores(seed, k, n)
    indices = torch.arange(n) * 3 + 7  # dataset indices need not be positions
    stream = StreamingTopK(k, m)
    for start, stop in zip(cuts, cuts[1:]):
        stream.update(scores[:, start:stop], indices[start:stop])
    top = stream.result()
    _assert_equal_top(top, top_influences_of(scores, indices, m))
    width = min(m, n)
    assert top.harmful_indices.shape == (k, width)
    full_order = scores.argsort(dim=1, descending=True)
    assert torch.equal(top.harmful_indices, indices[full_order[:, :width]])


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(1, 5))
def test_merging_per_shard_top_lists_equals_the_global_top_list(problem, world_size):
    n, k, m, seed, _ = problem
    scores = _distinct_scores(seed, k, n)
    tops = []
    for rank in range(world_size):
        local = torch.tensor(shard(range(n), rank, world_size), dtype=torch.long)
        stream = StreamingTopK(k, m)
        stream.update(scores[:, local], local)  # an empty shard contributes nothing
        tops.append(stream.result())
    merged = merge_top_influences(tops, m)
    _assert_equal_top(merged, top_influences_of(scores, torch.arange(n), m))
    for row in range(k):  # no example listed twice within a list, whatever the shard sizes
        assert len(set(merged.harmful_indices[row].tolist())) == merged.harmful_indices.shape[1]
        assert len(set(merged.helpful_indices[row].tolist())) == merged.helpful_indices.shape[1]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 50), st.integers(1, 4), st.integers(1, 4), st.integers(1, 17))
def test_batches_carry_exactly_the_dataset_indices_of_their_rows(n, world_size, rank_seed, batch_size):
    values = torch.arange(n, dtype=torch.float64) * 10
    data = IndexedData(TensorDataset(values, torch.arange(n)), batch_size=batch_size)
    rank = rank_seed % world_size
    wanted = shard(range(n), rank, world_size)
    seen = []
    for indices, (x, y) in data.batches_with_indices(wanted):
        assert len(indices) == len(x) <= batch_size
        assert torch.equal(y, indices) and torch.equal(x, values[indices])  # every row tied to its own index
        seen.extend(indices.tolist())
    assert seen == wanted  # in order, nothing padded, nothing dropped


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 10_000), st.integers(1, 9))
def test_sliced_batches_of_nested_subsets_equal_the_collated_ones(n, seed, batch_size):
    from torch.utils.data import Subset, default_collate

    class Counted(TensorDataset):
        fetched = 0

        def __getitem__(self, index):  # noqa: ANN001, ANN204 - a TensorDataset that counts its example fetches
            Counted.fetched += 1
            return super().__getitem__(index)

    generator = torch.Generator().manual_seed(seed)
    base = Counted(torch.randn(n + 5, 3, generator=generator), torch.randint(0, 4, (n + 5,), generator=generator))
    outer = torch.randperm(n + 5, generator=generator)[:n].tolist()
    inner = torch.randperm(n, generator=generator)[: max(1, n // 2)].tolist()
    dataset = Subset(Subset(base, outer), inner)  # what random_split of a random_split gives
    wanted = torch.randperm(len(dataset), generator=generator).tolist()
    sliced = IndexedData(dataset, batch_size=batch_size)
    collated = IndexedData(dataset, collate_fn=lambda rows: default_collate(rows), batch_size=batch_size)
    fast = list(sliced.batches_with_indices(wanted))
    assert Counted.fetched == 0  # sliced a batch at a time, not fetched example by example
    pairs = list(zip(fast, collated.batches_with_indices(wanted), strict=True))
    assert Counted.fetched == len(wanted)
    assert sum(len(indices) for (indices, _), _ in pairs) == len(wanted)
    for (fast_indices, fast_batch), (slow_indices, slow_batch) in pairs:
        assert torch.equal(fast_indices, slow_indices)
        assert len(fast_batch) == len(slow_batch) == 2
        assert all(torch.equal(a, b) for a, b in zip(fast_batch, slow_batch))
