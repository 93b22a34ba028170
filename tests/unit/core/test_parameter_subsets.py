"""Parameter subsets: frozen backbones, LoRA adapters (peft), and the ``parameters=`` selector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import influence
from lightning_influence.config import CGConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.tensors.params import select_parameters, trainable_parameters


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_selector_prefixes_globs_and_predicates():
    model = mlp()
    assert select_parameters(model, "4") == {"4.weight", "4.bias"}
    assert select_parameters(model, ["2", "4.bias"]) == {"2.weight", "2.bias", "4.bias"}
    assert select_parameters(model, "*.weight") == {"0.weight", "2.weight", "4.weight"}
    assert select_parameters(model, lambda name, p: p.dim() == 1) == {"0.bias", "2.bias", "4.bias"}
    assert list(trainable_parameters(model, "4")) == ["4.weight", "4.bias"]
    model[4].bias.requires_grad_(False)  # frozen parameters stay out even when selected
    assert list(trainable_parameters(model, "4")) == ["4.weight"]
    with pytest.raises(ValueError, match="matched none.*0.weight"):
        trainable_parameters(model, "head")
    with pytest.raises(ValueError, match="Expected `parameters`"):
        trainable_parameters(model, [3])


def test_last_layer_influence_equals_the_full_problem_restricted_to_that_layer():
    model = mlp()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    test = (x[:3], y[:3])
    last = influence(model, ce, loader, test, solver="exact", damping=0.1, parameters="4")
    # reference: the same problem with every other layer frozen
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("4."))
    frozen = influence(model, ce, loader, test, solver="exact", damping=0.1)
    assert torch.allclose(last, frozen, rtol=1e-10, atol=1e-12)
    assert last.shape == (3, 40)
    problem = InfluenceProblem(model, ce, loader, 0.1, CGConfig(), parameters=lambda n, p: n == "4.bias")
    assert problem.num_params == 3


def test_lora_scores_touch_only_adapter_parameters():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    base = Net().double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body", "head"]))
    for module in model.modules():  # LoRA initialises B to zero: make the adapters non-trivial
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            nn.init.normal_(module.weight, std=0.3)
    model.eval()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    problem = InfluenceProblem(model, ce, loader, 0.1, CGConfig())
    assert problem.params and all("lora_" in name for name in problem.params)
    assert problem.num_params == (2 * 6 + 8 * 2) + (2 * 8 + 3 * 2)  # A [r, in] and B [out, r] per adapted layer
    engine = problem.per_example
    assert not engine.plan.generic and set(engine.plan.hooks.values()) == {"linear"}
    # scores equal explicit per-example gradients over the adapters only
    adapters = [p for p in model.parameters() if p.requires_grad]
    reference = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce(model, (x[i:i + 1], y[i:i + 1]))[0],
                                                                                    adapters)]) for i in range(20)])
    s = torch.randn(2, problem.num_params, dtype=torch.float64)
    got = torch.cat(list(problem.scores(s)), dim=1)
    assert ((got + s @ reference.T).norm() / (s @ reference.T).norm()) <= 1e-10
    base_weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    influence(model, ce, loader, (x[:2], y[:2]), solver="cg", damping=10.0)  # Hessian damping above |lambda_min|
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters() if not p.requires_grad)
