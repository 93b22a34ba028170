"""What the analysis keeps alive and how large its transient peaks are: the residual memo keeps no solution, the
batched-or-looped timing of the Gauss-Newton product runs on a few examples, not the whole batch."""

from __future__ import annotations

import gc
import weakref

import torch
from helpers import cross_entropy_per_example
from torch import nn

from lightning_influence.config import LissaConfig, ProblemConfig
from lightning_influence.core.curvature import products
from lightning_influence.core.curvature.products import PRODUCT_PROBE_EXAMPLES, GaussNewtonProduct, batch_ggn
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.core.tensors.params import trainable_parameters
from lightning_influence.core.tensors.residual import ResidualMemo


def test_the_memo_finds_equal_content_without_keeping_the_tensors():
    memo = ResidualMemo()
    x, v = torch.randn(3, 50), torch.randn(3, 50)
    rows = torch.tensor([0.1, 0.2, 0.3])
    memo.add(x, v, 0.5, rows)
    alive = weakref.ref(x)
    copy = x.clone()
    del x
    gc.collect()
    assert alive() is None  # the memo holds a fingerprint, not the solution
    assert torch.equal(memo.find(copy, v.clone(), 0.5), rows)
    assert memo.find(copy, v, 0.25) is None  # another damping
    copy[1, 7] += 1e-6
    assert memo.find(copy, v, 0.5) is None  # changed content (in place): no match
    assert memo.find(torch.randn(3, 50), v, 0.5) is None


def test_a_lissa_solve_keeps_no_solution_alive_in_the_memo():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    problem = InfluenceProblem(model, cross_entropy_per_example, loader,
                               ProblemConfig(solver=LissaConfig(depth=60, check_every=10), damping=0.1))
    with analysis_mode(model):
        vectors = problem.gradients((x[:2], y[:2]))
        result = problem.solve(vectors)
        known = problem.known_residual(result.vectors.clone(), vectors)
    held = [value for entry in problem._residuals._entries for value in entry if isinstance(value, torch.Tensor)]
    assert not any(t.numel() >= vectors.numel() for t in held)
    assert known is not None and float(known.max()) == result.info.residual  # the record's verdict, remembered


def _small_product_problem():
    """A seeded ReLU net's functional loss, its parameters and a batch of 100 random examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    loss = FunctionalLoss(model, cross_entropy_per_example, torch.float32)
    params = trainable_parameters(model, None, torch.float32)
    return loss, params, (torch.randn(100, 5), torch.randint(0, 4, (100,)))


def _count_products(monkeypatch) -> list[tuple[int, bool]]:
    """Patch the batch Gauss-Newton product so that each call appends (batch size, batched) to the returned list."""
    calls: list[tuple[int, bool]] = []

    def counted(loss_, params_, batch_, vectors_, batched=True):
        calls.append((len(batch_[0]), batched))
        return batch_ggn(loss_, params_, batch_, vectors_, batched)

    monkeypatch.setattr(products, "batch_ggn", counted)
    return calls


def test_the_product_timing_probes_a_slice_and_returns_the_whole_batch_product(monkeypatch):
    loss, params, batch = _small_product_problem()
    vectors = torch.randn(3, sum(p.numel() for p in params.values()))
    calls = _count_products(monkeypatch)
    product = GaussNewtonProduct(loss, params)
    with torch.enable_grad():
        got = product(batch, vectors)
        expected = batch_ggn(loss, params, batch, vectors, False)
    assert [size for size, _ in calls] == [PRODUCT_PROBE_EXAMPLES, PRODUCT_PROBE_EXAMPLES, 100]  # two probes, the batch
    assert product.batched is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_row_distance_in_pieces_equals_the_norm_of_the_difference():
    from lightning_influence.core.solvers.neumann import DISTANCE_PIECE, row_distance

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2 * DISTANCE_PIECE + 17, generator=generator)
    b = a + 1e-3 * torch.randn(a.shape, generator=generator)
    torch.testing.assert_close(row_distance(a, b), (a - b).double().norm(dim=1).float(), rtol=1e-6, atol=0)


def test_vectors_too_many_for_the_batched_form_go_looped_without_a_probe(monkeypatch):
    loss, params, batch = _small_product_problem()
    p = sum(t.numel() for t in params.values())
    vectors = torch.randn(3, p)
    assert products.batched_fits(3, p, 4, "cpu")
    monkeypatch.setattr(products, "PER_EXAMPLE_BYTES", products.BATCHED_COPIES * 3 * p * 4 - 1)  # one byte short
    assert not products.batched_fits(3, p, 4, "cpu") and products.batched_fits(2, p, 4, "cpu")
    calls = _count_products(monkeypatch)
    product = GaussNewtonProduct(loss, params)
    with torch.enable_grad():
        got = product(batch, vectors)
        expected = batch_ggn(loss, params, batch, vectors, False)
    assert calls == [(100, False)]  # no probe: looped on the whole batch
    torch.testing.assert_close(got, expected)
