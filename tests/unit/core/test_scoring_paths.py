"""Scoring paths beyond the basic equality test: the layer-factored path's coverage and fallbacks, and the
out-of-memory retry."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_influence.core.scoring as scoring
from lightning_influence.core.per_example.factored import factored_layers
from lightning_influence.core.per_example.losses import FunctionalLoss
from lightning_influence.core.scoring import iter_scores, resolve_method, score_chunk
from lightning_influence.core.tensors.params import trainable_parameters


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class StridedCNN(nn.Module):
    """Convolutions with stride, dilation, no bias, rectangular kernels, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 5, (3, 2), padding=(1, 0), dilation=(1, 2))
        self.b = nn.Conv2d(5, 4, 3, stride=2, bias=False)
        self.head = nn.Linear(4 * 4 * 2, 6)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).flatten(1))


class TokenModel(nn.Module):
    """A linear layer applied to every position of a sequence, used twice (shared weights), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(7, 7)
        self.head = nn.Linear(7, 6, bias=False)

    def forward(self, x):
        h = torch.tanh(self.mix(torch.tanh(self.mix(x))))
        return self.head(h).mean(dim=1)


class TiedOutput(nn.Module):
    """Uses a Linear's weight outside its forward: the factored path cannot see that use."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 9)
        self.extra = nn.Linear(9, 9)

    def forward(self, x):
        h = torch.tanh(self.extra(torch.tanh(self.embed(x))))
        return h @ self.embed.weight  # [B, 6] logits through the transposed embedding


def _explicit(model, x, y, s):
    rows = []
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        rows.append(-s @ torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("make_model, shape", [(StridedCNN, (2, 9, 8)), (TokenModel, (4, 7))])
def test_factored_scores_equal_explicit_gradients(make_model, shape):
    torch.manual_seed(0)
    model = make_model().double()
    x, y = torch.randn(11, *shape, dtype=torch.float64), torch.randint(0, 6, (11,))
    params = trainable_parameters(model)
    assert factored_layers(model, params) is not None
    s = torch.randn(3, sum(p.numel() for p in params.values()), dtype=torch.float64)
    got = score_chunk(FunctionalLoss(model, _loss), params, (x, y), s, "factored")
    expected = _explicit(model, x, y, s)
    assert (got - expected).norm() / expected.norm() <= 1e-10


def test_models_outside_the_factored_form_fall_back():
    norm_model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    assert factored_layers(norm_model, trainable_parameters(norm_model)) is None
    assert resolve_method("auto", 10, factorable=False) == "hooks"  # the hook engine covers LayerNorm
    assert resolve_method("auto", 10**6, factorable=False) == "hooks"
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        score_chunk(FunctionalLoss(norm_model, _loss), trainable_parameters(norm_model),
                    (torch.randn(2, 4), torch.tensor([0, 1])), torch.zeros(1, 43), "factored")
    frozen = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    frozen[0].weight.requires_grad_(False)  # the bias alone stays trainable: not a whole layer
    assert factored_layers(frozen, trainable_parameters(frozen)) is None
    frozen[0].bias.requires_grad_(False)  # the first layer fully frozen: the rest factors
    layers = factored_layers(frozen, trainable_parameters(frozen))
    assert layers is not None and [layer.weight for layer in layers] == ["2.weight"]


def test_auto_spot_check_catches_a_weight_used_outside_its_layer():
    torch.manual_seed(1)
    model = TiedOutput().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 6, (10,))
    params = trainable_parameters(model)
    assert factored_layers(model, params) is not None  # looks factorable by its parameters...
    s = torch.randn(2, sum(p.numel() for p in params.values()), dtype=torch.float64)
    loss = FunctionalLoss(model, _loss)
    with pytest.warns(UserWarning, match="disagreed with autograd"):
        got = torch.cat(list(iter_scores(loss, params, [(x, y)], s, "auto", chunk_size=4)), dim=1)
    expected = _explicit(model, x, y, s)
    assert (got - expected).norm() / expected.norm() <= 1e-10  # ...but auto noticed and fell back


def test_out_of_memory_chunks_are_retried_in_halves(monkeypatch):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(21, 5, dtype=torch.float64), torch.randint(0, 3, (21,))
    params = trainable_parameters(model)
    s = torch.randn(2, sum(p.numel() for p in params.values()), dtype=torch.float64)
    loss = FunctionalLoss(model, _loss)
    expected = torch.cat(list(iter_scores(loss, params, [(x, y)], s, "jvp", chunk_size=32)), dim=1)
    real, sizes = scoring.score_chunk, []

    def fragile(loss, params, batch, s_vectors, method, *args, **kwargs):
        sizes.append(len(batch[1]))
        if len(batch[1]) > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(loss, params, batch, s_vectors, method, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_chunk", fragile)
    with pytest.warns(UserWarning, match="out of memory"):
        got = torch.cat(list(iter_scores(loss, params, [(x, y)], s, "jvp", chunk_size=32)), dim=1)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert sizes[:3] == [21, 10, 5] and max(sizes[3:]) <= 5  # halved until it fits, then kept small

    def always_oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.")

    monkeypatch.setattr(scoring, "score_chunk", always_oom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="out of memory"):
            list(iter_scores(loss, params, [(x, y)], s, "jvp", chunk_size=4))

    def other_error(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(scoring, "score_chunk", other_error)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(iter_scores(loss, params, [(x, y)], s, "jvp", chunk_size=4))
