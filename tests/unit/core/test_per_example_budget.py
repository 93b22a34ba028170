"""Per-example gradients at the sizes users train: chunks bounded by a memory budget, one ``[B, P]`` buffer.

A 1M-parameter model's per-example gradients are 4 MB an example; before these chunks the self-influence pass held
64 of them at once (plus a flattened copy) and the trust check the whole union of the monitored points' top lists
(measured on the 1.0M-parameter CNN of ``benchmarks/scale.py``: 2.5 GiB peaks against a 0.6 GiB training)."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy_per_example
from torch import nn

from lightning_influence.analysis import diagnostics
from lightning_influence.config import ProblemConfig
from lightning_influence.core.per_example.engine import PerExampleEngine
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors import memory
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.core.tensors.params import flatten, trainable_parameters


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5)).eval()


def test_chunk_is_the_budget_over_the_gradient_size_at_least_one_at_most_requested():
    assert memory.per_example_chunk(1_000_000, 256, budget_bytes=64 * 2**20) == 16
    assert memory.per_example_chunk(1_000, 256, budget_bytes=64 * 2**20) == 256  # the request bounds it
    assert memory.per_example_chunk(10**9, 256, budget_bytes=64 * 2**20) == 1  # never zero
    assert memory.per_example_chunk(1_000, 256, element_size=8, budget_bytes=8_000 * 10) == 10
    default = memory.per_example_chunk(1_000_000, 10**6)
    assert 1 <= default <= memory.PER_EXAMPLE_BYTES // 4_000_000  # the default budget, or less on a full machine


def test_flat_gradients_equal_the_per_parameter_ones_with_generic_parameters_too():
    model = small_cnn()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    loss = FunctionalLoss(model, cross_entropy_per_example, torch.float32)
    params = trainable_parameters(model, None, torch.float32)
    engine = PerExampleEngine(loss, params)
    engine._demote({"4.bias"}, "test: one generic parameter")  # the generic path writes its block too
    flat = engine.grads((x, y))
    assert flat.shape == (6, sum(p.numel() for p in params.values()))
    torch.testing.assert_close(flat, flatten(engine.grad_dict((x, y)), batch_dims=1))
    for i in range(6):  # and each row is that example's own gradient (autograd, one example at a time)
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        one = loss(leaves, (x[i : i + 1], y[i : i + 1]))[0]
        reference = flatten(list(torch.autograd.grad(one, list(leaves.values()))))
        torch.testing.assert_close(flat[i], reference, rtol=1e-4, atol=1e-6)


def test_repeat_agreement_in_chunks_equals_it_in_one_block(monkeypatch):
    model = small_cnn()
    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 8, 8), torch.randint(0, 5, (40,)))
    train = IndexedData(data, batch_size=16)
    problem = InfluenceProblem(model, cross_entropy_per_example, train.loader(), ProblemConfig(damping=0.1))
    p = problem.num_params
    halves = torch.randn(2, p), torch.randn(2, p)

    class Top:  # two points' harmful and helpful lists, overlapping
        harmful_indices = [torch.tensor([0, 3, 5, 7]), torch.tensor([5, 9, 11, 13])]
        helpful_indices = [torch.tensor([20, 21, 22, 23]), torch.tensor([3, 30, 31, 39])]

    sizes: list[int] = []
    gradients = problem.gradients

    def recorded(batch):
        sizes.append(len(batch[1]))
        return gradients(batch)

    with analysis_mode(model):
        whole = diagnostics.repeat_agreement(problem, train, Top(), *halves)
        monkeypatch.setattr(memory, "PER_EXAMPLE_BYTES", 3 * p * 4)  # three examples' float32 gradients
        monkeypatch.setattr(problem, "gradients", recorded)
        chunked = diagnostics.repeat_agreement(problem, train, Top(), *halves)
    assert max(sizes) == 3 and sum(sizes) == 14  # the 14 distinct listed examples, 3 at a time
    for (a, b), (c, d) in zip(whole, chunked):
        assert a == pytest.approx(c, abs=1e-6) and b == pytest.approx(d, abs=1e-6)
    assert all(a is not None for a, _ in whole)
