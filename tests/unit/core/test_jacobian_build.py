"""Building the stored output Jacobian (lightning_influence.core.curvature.jacobian, #25): the data read once, one
forward pass per batch for all r columns, batched backward passes, and the same numbers as the per-column build
it replaced, bit for bit, so the same s_test."""

from __future__ import annotations

import pytest
import torch
from helpers import LogisticRegression, SmallCNN, cross_entropy_per_example, digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence.config import CGConfig, ProblemConfig
from lightning_influence.core.curvature import jacobian
from lightning_influence.core.curvature.products import split_forward
from lightning_influence.core.per_example.engine import PerExampleEngine
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode


@pytest.fixture(autouse=True)
def _store_whatever_its_speed(monkeypatch):
    monkeypatch.setattr(jacobian, "TIMED", False)


class CountingDigits(Dataset):
    """The first ``n`` digits, counting the reads of each example."""

    def __init__(self, n: int) -> None:
        self.x, self.y = (t[:n] for t in digits(torch.float32))
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        self.reads += 1
        return self.x[index], self.y[index]


class SharedScale(nn.Module):
    """A CNN whose extra parameter is used outside any module (the engine's generic path)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "batch_norm":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                              nn.Linear(4 * 64, 10))
        with torch.no_grad():  # running statistics away from their initial values
            model.train()(digits(torch.float32)[0][:200])
        return model.eval()
    return {"logreg": LogisticRegression, "cnn": SmallCNN, "generic": SharedScale}[name]().float()


def _per_column_factors(problem: InfluenceProblem, loader: DataLoader) -> torch.Tensor:
    """The factors as the build computed them before (#25): the Hessians by M separate double-backward passes, then
    one forward and backward pass of the hook engine per column ``c`` of the roots."""
    loss, params = problem.loss, problem.params
    hessians = []
    for batch in loader:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        split = split_forward(loss, leaves, batch)
        (grad,) = torch.autograd.grad(split.losses.sum(), split.leaves, create_graph=True)
        rows = [torch.autograd.grad(grad[:, m].sum(), split.leaves, retain_graph=True)[0] for m in range(grad.shape[1])]
        hessians.append(torch.stack(rows, dim=1).detach())
    roots = jacobian._hessian_roots(torch.cat(hessians))
    target = jacobian.split_module(loss, params, next(iter(loader)))
    engine = PerExampleEngine(FunctionalLoss(loss.model, jacobian._Outputs(loss, target), loss.dtype), params)
    rows, start = [], 0
    for batch in loader:
        size = len(batch[1])
        part = roots[start : start + size]
        rows.append(torch.stack([engine.grads((batch, part[:, :, c])) for c in range(part.shape[2])], dim=1))
        start += size
    return torch.cat(rows)


@pytest.mark.parametrize("name", ["logreg", "cnn", "batch_norm", "generic"])
def test_the_one_pass_build_gives_the_per_column_factors_bit_for_bit(name):
    model = _model(name)
    n = 60 if name == "generic" else 300  # the generic path loops over examples
    data = CountingDigits(n)
    loader = DataLoader(data, batch_size=128 if n > 128 else 32)
    problem = InfluenceProblem(model, cross_entropy_per_example, loader, ProblemConfig(solver=CGConfig(), damping=0.01))
    with analysis_mode(model), torch.enable_grad():
        data.reads = 0
        store = problem.products.stored()
        assert store is not None and data.reads == n  # every example read once
        expected = _per_column_factors(problem, loader)
    assert store.factors.shape == expected.shape == (n, 9, problem.num_params)
    assert torch.equal(store.factors, expected)


def test_the_columns_fall_back_to_one_pass_each_where_a_batched_backward_fails(monkeypatch):
    model = _model("cnn")
    loader = DataLoader(CountingDigits(200), batch_size=100)
    problem = InfluenceProblem(model, cross_entropy_per_example, loader, ProblemConfig(solver=CGConfig(), damping=0.01))
    original = torch.autograd.grad

    def no_batched(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule (simulated)")
        return original(*args, **kwargs)

    with analysis_mode(model), torch.enable_grad():
        batched = problem.products.stored().factors.clone()
        monkeypatch.setattr(torch.autograd, "grad", no_batched)
        problem.products._store = None  # build again, every batched backward refused
        looped = problem.products.stored().factors
    assert torch.equal(batched, looped)


def test_a_cg_solve_on_the_store_reads_the_data_only_to_build_it_and_gives_the_per_column_solution():
    model = _model("cnn")
    data = CountingDigits(300)
    loader = DataLoader(data, batch_size=128)
    x, y = digits(torch.float32)
    settings = ProblemConfig(solver=CGConfig(), damping=0.01)
    problem = InfluenceProblem(model, cross_entropy_per_example, loader, settings)
    with analysis_mode(model):
        vectors = problem.gradients((x[1500:1504], y[1500:1504]))
        data.reads = 0
        result = problem.solve(vectors)
        assert data.reads == 300  # the residual verdict reads index chunks of the store, not the data
        with torch.enable_grad():
            expected_factors = _per_column_factors(problem, loader)
        other = InfluenceProblem(model, cross_entropy_per_example, loader, settings)
        other.products._store = jacobian.OutputJacobian(expected_factors)  # the per-column store
        expected = other.solve(vectors)
    assert result.info.converged and torch.equal(result.vectors, expected.vectors)


def test_batches_too_large_to_keep_are_read_again_for_the_same_factors(monkeypatch):
    model = _model("cnn")
    data = CountingDigits(200)
    loader = DataLoader(data, batch_size=64)
    settings = ProblemConfig(solver=CGConfig(), damping=0.01)
    with analysis_mode(model), torch.enable_grad():
        kept = InfluenceProblem(model, cross_entropy_per_example, loader, settings).products.stored().factors
        monkeypatch.setattr(jacobian, "KEEP_BATCHES_FRACTION", 0.0)  # nothing may be kept
        data.reads = 0
        again = InfluenceProblem(model, cross_entropy_per_example, loader, settings).products.stored().factors
    assert data.reads == 400 and torch.equal(kept, again)  # the Hessians' pass, then the rows' pass
