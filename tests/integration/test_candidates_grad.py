"""Candidates by last-layer gradients (feature_fn="last_layer_grad"): the factored inner product equals the
explicit per-example gradients', the ranking is |<G_test, G_i>|, and candidates do not depend on chunking or
on the number of ranks."""

from __future__ import annotations

import pytest
import torch
from helpers import cross_entropy_per_example, digits, loader
from helpers.distributed import explain_on_threads, scored_indices
from torch import nn
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.config import LAST_LAYER_GRAD, ExplainConfig
from lightning_influence.core.candidates import NearestNeighbours, knn_torch, select_candidates
from lightning_influence.core.per_example.features import GradientFactors, factored_similarity, last_layer_gradients
from lightning_influence.core.tensors.data import IndexedData

N_TRAIN = 180
DAMPING = 1.0


def _mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10, bias=bias)).double()


@pytest.fixture(scope="module")
def data():
    x, y = digits(torch.float64)
    return x[:N_TRAIN], y[:N_TRAIN], x[1500:1504], y[1500:1504]


def _explicit_last_layer_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, O * (I + 1)]`` per-example gradients of the last layer, one backward per example, laid out as
    ``[dW | db]`` per output row (the order of :meth:`GradientFactors.flat`)."""
    last = model[-1]
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        cross_entropy_per_example(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        grad = last.weight.grad if last.bias is None else torch.cat([last.weight.grad, last.bias.grad[:, None]], 1)
        rows.append(grad.flatten().clone())
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [True, False])
def test_factored_similarity_equals_the_explicit_gradient_inner_products(data, bias):
    x, y, _, _ = data
    model = _mlp(bias)
    factors = last_layer_gradients(model, (x[:40], y[:40]), cross_entropy_per_example)
    explicit = _explicit_last_layer_gradients(model, x[:40], y[:40])
    torch.testing.assert_close(factors.flat(), explicit, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(factored_similarity(factors, factors), explicit @ explicit.T, rtol=1e-10, atol=1e-14)
    assert factors.shape == explicit.shape


def test_candidates_are_the_largest_gradient_inner_products_in_magnitude_and_chunking_changes_nothing(data):
    x, y, xt, yt = data
    model = _mlp()
    found = select_candidates(model, (xt, yt), IndexedData(TensorDataset(x, y), batch_size=16).batches_with_indices(),
                              12, LAST_LAYER_GRAD, loss_fn=cross_entropy_per_example)
    similarity = _explicit_last_layer_gradients(model, xt, yt) @ _explicit_last_layer_gradients(model, x, y).T
    brute = similarity.abs().argsort(dim=1, descending=True, stable=True)[:, :12]
    assert torch.equal(found.indices, brute)
    torch.testing.assert_close(found.distances, -similarity.abs().gather(1, brute), rtol=1e-10, atol=1e-14)
    queries = last_layer_gradients(model, (xt, yt), cross_entropy_per_example)
    keys = last_layer_gradients(model, (x, y), cross_entropy_per_example)
    reference = knn_torch(queries, keys, 12, chunk_size=len(x))
    for chunk in (1, 7, 64):
        chunked = knn_torch(queries, keys, 12, chunk_size=chunk)
        assert torch.equal(chunked.indices, reference.indices)
        assert torch.equal(chunked.distances, reference.distances)


def test_a_planted_near_duplicate_of_each_test_gradient_is_found_with_either_sign(data):
    """|<G_t, G_i>| <= |G_t| |G_i| (Cauchy-Schwarz): a near-copy of G_t as large as the largest training gradient
    beats every training example, and so does its negation (a point of the other sign, equally influential)."""
    x, y, xt, yt = data
    model = _mlp()
    train = last_layer_gradients(model, (x, y), cross_entropy_per_example)
    test = last_layer_gradients(model, (xt, yt), cross_entropy_per_example)
    largest = train.flat().norm(dim=1).max()
    scale = (largest / test.flat().norm(dim=1))[:, None]
    noise = torch.randn(test.inputs.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    near = GradientFactors(test.out_grads * scale, test.inputs + 1e-3 * noise)
    opposite = GradientFactors(-test.out_grads * scale, test.inputs)
    positions = torch.tensor([17, 60, 111, 170])  # where the planted rows go
    out_grads, inputs = train.out_grads.clone(), train.inputs.clone()
    out_grads[positions], inputs[positions] = near.out_grads, near.inputs
    keys = GradientFactors(torch.cat([out_grads, opposite.out_grads]), torch.cat([inputs, opposite.inputs]))
    found = knn_torch(test, keys, 2)
    assert found.indices.sort(1).values.tolist() == [[int(p), N_TRAIN + i] for i, p in enumerate(positions)]
    signs = factored_similarity(test, keys).gather(1, found.indices).sign().sort(1).values
    assert signs.tolist() == [[-1.0, 1.0]] * len(xt)



def test_same_gradient_candidates_on_any_number_of_ranks(data):
    x, y, _, _ = data
    model = _mlp()
    vx, vy = digits(torch.float64)
    train = IndexedData(TensorDataset(x, y), batch_size=16)
    val = IndexedData(TensorDataset(vx[1500:1530], vy[1500:1530]))
    settings = ExplainConfig(top_k=4, num_worst=3, num_candidates=20, keep_full_scores=True, feature_fn=LAST_LAYER_GRAD,
                             preselect="always")
    single = explain_on_threads(1, model, train, val, settings, DAMPING)[0]
    test_x = vx[1500:1530][[p.val_index for p in single.points]]
    test_y = vy[1500:1530][[p.val_index for p in single.points]]
    similarity = _explicit_last_layer_gradients(model, test_x, test_y) @ _explicit_last_layer_gradients(model, x, y).T
    nearest = similarity.abs().argsort(dim=1, descending=True)[:, :20]
    assert torch.equal(scored_indices(single), nearest.sort(1).values)
    for world_size in (2, 3):
        threaded = explain_on_threads(world_size, model, train, val, settings, DAMPING)[0]
        assert torch.equal(scored_indices(threaded), scored_indices(single))


def test_influence_with_gradient_candidates_keeps_the_full_scores_of_the_candidates(data):
    x, y, xt, yt = data
    model = _mlp()
    train = loader(x, y, batch_size=32)
    full = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING)
    sparse = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING,
                          num_candidates=15, feature_fn=LAST_LAYER_GRAD, preselect="always")
    kept = ~sparse.isnan()
    assert kept.sum(dim=1).tolist() == [15] * len(xt)
    default = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING,
                           num_candidates=15, preselect="always")  # the default feature choice is last_layer_grad (torch backend)
    torch.testing.assert_close(default, sparse, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sparse[kept], full[kept], rtol=1e-9, atol=1e-12)


def test_bad_gradient_feature_choices_give_clear_errors(data):
    x, y, xt, yt = data
    model = _mlp()
    batches = IndexedData(TensorDataset(x, y)).batches_with_indices()
    with pytest.raises(ValueError, match="last_layer_grad"):
        select_candidates(model, (xt, yt), batches, 5, "last_layer_gradient", loss_fn=cross_entropy_per_example)
    with pytest.raises(ValueError, match="knn_backend='torch'"):
        select_candidates(model, (xt, yt), batches, 5, LAST_LAYER_GRAD, backend="faiss",
                          loss_fn=cross_entropy_per_example)
    with pytest.raises(ValueError, match="loss function"):
        select_candidates(model, (xt, yt), batches, 5, LAST_LAYER_GRAD)
    factors = last_layer_gradients(model, (xt, yt), cross_entropy_per_example)
    with pytest.raises(ValueError, match="same kind and width"):  # gradients vs activations of the same width
        NearestNeighbours(factors, 3).update(torch.zeros(5, factors.shape[1], dtype=torch.float64), torch.arange(5))
    with pytest.raises(ValueError, match="per-example losses"):
        last_layer_gradients(model, (xt, yt), lambda m, b: cross_entropy_per_example(m, b).mean())

