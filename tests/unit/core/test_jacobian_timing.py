"""The stored output Jacobian is kept only where its products are faster than autograd's (#29): a small dense
model's autograd product costs less than ``2 r P`` per example and vector, and LiSSA ran nine times longer with
an MLP's store in ``benchmarks/scale.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import SmallCNN, cross_entropy_per_example, digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.config import LissaConfig, ProblemConfig
from lightning_influence.core.curvature import jacobian
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode


def _problem(model: nn.Module, n: int = 256) -> InfluenceProblem:
    x, y = digits(torch.float32)
    loader = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=128)
    return InfluenceProblem(model, cross_entropy_per_example, loader, ProblemConfig(solver=LissaConfig(depth=5),
                                                                                    damping=0.1))


@pytest.mark.parametrize("stored_first", [True, False])
def test_the_store_is_kept_only_when_its_timed_product_is_the_faster(monkeypatch, stored_first):
    # the stored product is timed first, the autograd one second (on PRODUCT_PROBE_EXAMPLES examples, then, unless
    # the store already won, on the whole probe): fake clocks decide which wins
    times = iter([1.0, 2.0] if stored_first else [2.0, 1.0, 1.0])
    monkeypatch.setattr(jacobian, "SPEED_VERDICTS", {})  # measure afresh: the verdict is kept per model shape
    monkeypatch.setattr(jacobian, "_best_seconds", lambda call, device, repeats=1, warm_up=None: (call(), next(times))[1])
    torch.manual_seed(0)
    model = SmallCNN().float()
    problem = _problem(model)
    with analysis_mode(model):
        assert (problem.products.stored() is not None) is stored_first


def test_a_small_dense_model_keeps_the_autograd_products(monkeypatch):
    # 64-64-64-10 tanh MLP (8,970 parameters), eight vectors: the stored product (9 rows of P per example,
    # gathered) measured about four times slower than autograd's on 128-example minibatches on one CPU thread
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 10))
    monkeypatch.setattr(jacobian, "SPEED_VERDICTS", {})
    with analysis_mode(model):
        assert _problem(model).products.stored() is None
        assert _problem(model).products.stored() is None and len(jacobian.SPEED_VERDICTS) == 1  # measured once
    monkeypatch.setattr(jacobian, "TIMED", False)
    with analysis_mode(model):
        assert _problem(model).products.stored() is not None  # it fits: only the timing turned it down
