"""Analysis precision: float32 whatever the training precision (bf16 weights upcast, autocast off), float64 on
request; the attention kernel used during analysis is twice differentiable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import influence
from lightning_influence.config import CGConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.modes import analysis_mode


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 3))


def data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_bf16_weights_are_analysed_in_float32_and_left_untouched():
    model = net().to(torch.bfloat16).eval()
    model[0].weight.requires_grad_(False)  # a frozen bf16 weight is upcast too
    reference = copy.deepcopy(model).float()  # the same values in float32
    x, y = data()
    x = x.to(torch.bfloat16).float()  # values representable in bf16, so both runs see the same inputs
    before = {n: p.clone() for n, p in model.state_dict().items()}
    problem = InfluenceProblem(model, ce, [(x, y)], 0.1, CGConfig())
    assert all(p.dtype == torch.float32 for p in problem.params.values())
    with analysis_mode(model):
        got = problem.gradients((x.to(torch.bfloat16), y))  # bf16 inputs are cast as well
    expected = InfluenceProblem(reference, ce, [(x, y)], 0.1, CGConfig()).gradients((x, y))
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in model.state_dict().items())


def test_float64_option_on_a_float32_model_matches_a_float64_copy():
    model = net().eval()
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    got = influence(model, ce, loader, (x[:2], y[:2]), solver="exact", damping=0.5, dtype=torch.float64)
    loader64 = DataLoader(TensorDataset(x.double(), y), batch_size=6)
    expected = influence(copy.deepcopy(model).double(), ce, loader64, (x[:2].double(), y[:2]), solver="exact",
                         damping=0.5)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert next(model.parameters()).dtype == torch.float32


def test_autocast_is_off_during_analysis():
    model = net().eval()
    x, y = data()
    problem = InfluenceProblem(model, ce, [(x, y)], 0.1, CGConfig())
    plain = problem.gradients((x, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = problem.gradients((x, y))
        with analysis_mode(model):
            assert not torch.is_autocast_enabled("cpu")
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, plain, rtol=1e-6, atol=1e-7)


def test_attention_hvp_runs_in_analysis_mode():
    attention = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 4, requires_grad=True)
    with analysis_mode(attention):  # double backward through scaled_dot_product_attention
        out = attention(x, x, x, need_weights=False)[0].pow(2).sum()
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        (hv,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(hv).all()


@pytest.mark.parametrize("dtype", [torch.int64])
def test_non_floating_dtype_is_rejected(dtype):
    with pytest.raises(ValueError, match="floating dtype"):
        InfluenceProblem(net(), ce, [data()], 0.1, CGConfig(), dtype=dtype)
