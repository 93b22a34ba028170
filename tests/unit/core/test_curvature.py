"""Gauss-Newton curvature products against explicit J^T H_out J, the output capture and its error messages."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import LogisticRegression, SmallCNN, cross_entropy_per_example, digits
from torch import nn

from lightning_influence.core.curvature import batch_product, curvature_matrix
from lightning_influence.core.curvature.products import OutputCaptureError, SplitLoss, batch_ggn, dataset_product
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.tensors.params import flatten, trainable_parameters


def _explicit_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i J_i^T H_out,i J_i`` from the full Jacobian (jacrev) and per-example output Hessians."""
    params = trainable_parameters(model)
    flat = flatten(params)

    def outputs(vector: torch.Tensor) -> torch.Tensor:
        chunks, offset = {}, 0
        for name, p in params.items():
            chunks[name] = vector[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return torch.func.functional_call(model, chunks, (x,))

    jacobian = torch.func.jacrev(outputs)(flat)  # [B, O, P]
    logits = outputs(flat).detach()
    h_out = torch.func.vmap(torch.func.hessian(lambda z, t: F.cross_entropy(z[None], t[None])))(logits, y)
    return torch.einsum("bop,boq,bqr->pr", jacobian, h_out, jacobian) / len(y)


@pytest.mark.parametrize("make_model", [
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)),
    SmallCNN,
], ids=["mlp", "cnn"])
@pytest.mark.parametrize("batched", [True, False])
def test_ggn_product_equals_explicit_jt_h_j(make_model, batched):
    torch.manual_seed(0)
    model = make_model().double()
    x, y = digits(torch.float64)
    x, y = x[:24], y[:24]
    loss = FunctionalLoss(model, cross_entropy_per_example)
    params = trainable_parameters(model)
    expected_matrix = _explicit_ggn(model, x, y)
    vectors = torch.randn(3, expected_matrix.shape[0], dtype=torch.float64)
    got = batch_ggn(loss, params, (x, y), vectors, batched=batched)
    expected = vectors @ expected_matrix
    assert float((got - expected).norm() / expected.norm()) <= 1e-8
    dense = curvature_matrix(loss, params, [(x[:10], y[:10]), (x[10:], y[10:])], "gauss_newton")
    assert float((dense - expected_matrix).norm() / expected_matrix.norm()) <= 1e-8


def test_ggn_equals_hessian_for_logistic_regression():
    """The model is linear in its parameters, so the Gauss-Newton matrix is the Hessian."""
    torch.manual_seed(0)
    model = LogisticRegression().double()
    x, y = digits(torch.float64)
    batches = [(x[:40], y[:40]), (x[40:100], y[40:100])]
    loss = FunctionalLoss(model, cross_entropy_per_example)
    params = trainable_parameters(model)
    ggn = curvature_matrix(loss, params, batches, "gauss_newton")
    hessian = curvature_matrix(loss, params, batches, "hessian")
    assert float((ggn - hessian).norm() / hessian.norm()) <= 1e-8
    vectors = torch.randn(2, ggn.shape[0], dtype=torch.float64)
    by_products = dataset_product(batch_product(loss, params, "gauss_newton"), batches, vectors)
    torch.testing.assert_close(by_products, vectors @ hessian, rtol=1e-8, atol=1e-12)


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    features: torch.Tensor


class _ModelOutputLike(collections.OrderedDict):
    """Like transformers' ModelOutput: a dict whose items are also attributes."""

    def __getattr__(self, name):
        return self[name]


class _Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features)
        if self.kind == "dict":
            return {"logits": logits, "features": features, "count": torch.tensor(3)}
        if self.kind == "dataclass":
            return _Output(logits, features)
        if self.kind == "model_output":
            return _ModelOutputLike(logits=logits, features=features)
        return (logits, [features])


@pytest.mark.parametrize("kind", ["dict", "dataclass", "model_output", "tuple"])
def test_structured_outputs_are_captured(kind):
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    plain = _Structured("tensor").double()
    model = _Structured(kind).double()
    model.load_state_dict(plain.state_dict())

    def structured_loss(m, batch):
        out = m(batch[0])
        logits = out[0] if kind == "tuple" else out["logits"] if isinstance(out, dict) else out.logits
        return F.cross_entropy(logits, batch[1], reduction="none")

    def plain_loss(m, batch):
        return F.cross_entropy(m.head(m.body(batch[0])), batch[1], reduction="none")

    params = trainable_parameters(model)
    vectors = torch.randn(2, flatten(params).numel(), dtype=torch.float64)
    got = batch_ggn(FunctionalLoss(model, structured_loss), params, (x[:30], y[:30]), vectors)
    split = SplitLoss(lambda m, b: m.head(m.body(b[0])), lambda out, b: F.cross_entropy(out, b[1], reduction="none"))
    expected = batch_ggn(FunctionalLoss(plain, split), trainable_parameters(plain), (x[:30], y[:30]), vectors)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert "SplitLoss" in repr(type(split)) and bool((split(plain, (x[:3], y[:3])) > 0).all())
    # the submodules alone (a LightningModule calling self.net(x), say): the split is at the last top-level call
    submodules = batch_ggn(FunctionalLoss(plain, plain_loss), trainable_parameters(plain), (x[:30], y[:30]), vectors)
    torch.testing.assert_close(submodules, expected, rtol=1e-10, atol=1e-12)


def test_model_called_twice_or_parameters_used_directly_give_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    x, y = digits(torch.float64)
    params = trainable_parameters(model)
    vectors = torch.randn(1, 650, dtype=torch.float64)

    def twice(m, batch):
        return F.cross_entropy(m(batch[0]) + m(batch[0]), batch[1], reduction="none")

    with pytest.raises(OutputCaptureError, match=r"exactly once.*called 2 time.*model\(\.\.\.\)` exactly once.*SplitLoss"):
        batch_ggn(FunctionalLoss(model, twice), params, (x[:8], y[:8]), vectors)

    def with_l2(m, batch):
        l2 = sum((p**2).sum() for p in m.parameters())
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none") + 1e-3 * l2

    with pytest.raises(OutputCaptureError, match="uses parameters directly"):
        batch_ggn(FunctionalLoss(model, with_l2), params, (x[:8], y[:8]), vectors)


def test_transformer_encoder_ggn_is_symmetric_and_batched_equals_looped():
    """Attention runs on the math kernel (the fused ones have no double backward)."""
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 8)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                                 enable_nested_tensor=False)
            self.head = nn.Linear(8, 3)

        def forward(self, t):
            return self.head(self.encoder(self.embed(t)).mean(1))

    model = Tokens().double().eval()
    tokens, labels = torch.randint(0, 7, (12, 5)), torch.randint(0, 3, (12,))
    loss = FunctionalLoss(model, cross_entropy_per_example)
    params = trainable_parameters(model)
    vectors = torch.randn(2, flatten(params).numel(), dtype=torch.float64)
    batched = batch_ggn(loss, params, (tokens, labels), vectors, batched=True)
    looped = batch_ggn(loss, params, (tokens, labels), vectors, batched=False)
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    assert abs(float(vectors[0] @ batched[1] - vectors[1] @ batched[0])) <= 1e-10 * float(batched.norm())
    assert float(vectors[0] @ batched[0]) >= 0  # positive semi-definite
