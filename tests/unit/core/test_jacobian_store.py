"""The stored output Jacobian (lightning_influence.core.curvature.jacobian): the same Gauss-Newton products as autograd, the
same LiSSA minibatches, the same s_test, and a fallback wherever it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallCNN, cross_entropy_per_example, digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_influence.config import CGConfig, LissaConfig
from lightning_influence.core.curvature import jacobian
from lightning_influence.core.curvature.jacobian import RowBatch, build_output_jacobian, row_stream
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers.neumann import minibatch_stream
from lightning_influence.core.tensors.modes import analysis_mode


@pytest.fixture(autouse=True)
def _store_whatever_its_speed(monkeypatch):
    # these tests are about the store's products; whether it is also the faster is tested in test_jacobian_timing.py
    monkeypatch.setattr(jacobian, "TIMED", False)


def _cnn_problem(store: bool = True, config=None, batch_norm: bool = False):
    x, y = digits(torch.float32)
    x, y = x[:300], y[:300]
    torch.manual_seed(0)
    model = SmallCNN().float()
    if batch_norm:
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 64, 10))
        with torch.no_grad():  # running statistics away from their initial values
            model.train()(x.reshape(-1, 1, 8, 8) if x.dim() == 2 else x)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    config = config or LissaConfig(depth=200)
    return model, InfluenceProblem(model, cross_entropy_per_example, train, "auto", config, store_jacobian=store), x, y


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_stored_products_equal_the_autograd_gauss_newton_products(batch_norm):
    model, problem, x, y = _cnn_problem(batch_norm=batch_norm)
    vectors = torch.randn(3, problem.num_params, generator=torch.Generator().manual_seed(1))
    indices = torch.tensor([5, 17, 3, 250, 64, 65])
    with analysis_mode(model), torch.enable_grad():
        store = build_output_jacobian(problem.loss, problem.params, problem.train_loader, problem.device,
                                      problem.products.autograd)
        assert store is not None
        expected = problem.products.autograd((x[indices], y[indices]), vectors)
        assert _relative(store.product(RowBatch(indices), vectors), expected) < 1e-5
        whole = problem.products.autograd((x, y), vectors)  # a contiguous range is read as a view, not gathered
        assert _relative(store.product(RowBatch(torch.arange(len(x))), vectors), whole) < 1e-5


def test_transformer_with_dict_batches_has_the_same_products():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(1, 40, (40, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    labels = torch.arange(40) % 3

    class Sequences(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    problem = InfluenceProblem(model, loss_fn, DataLoader(Sequences(), batch_size=16), 0.1, CGConfig())
    vectors = torch.randn(2, problem.num_params, generator=torch.Generator().manual_seed(1))
    with analysis_mode(model), torch.enable_grad():
        store = build_output_jacobian(problem.loss, problem.params, problem.train_loader, problem.device,
                                      problem.products.autograd)
        assert store is not None and store.factors.shape == (40, 2, problem.num_params)  # cross-entropy: rank M - 1
        chosen = torch.tensor([0, 7, 39, 12])
        batch = {"input_ids": ids[chosen], "attention_mask": mask[chosen], "labels": labels[chosen]}
        assert _relative(store.product(RowBatch(chosen), vectors), problem.products.autograd(batch, vectors)) < 1e-5


def test_row_stream_draws_the_minibatches_of_the_data_stream():
    data = TensorDataset(torch.arange(50).float())
    rows, batches = row_stream(50, 16, seed=7), minibatch_stream(data, 16, None, 7, torch.device("cpu"))
    for _ in range(10):  # three epochs and more: the reshuffles agree too
        assert next(rows).indices.tolist() == next(batches)[0].long().tolist()


def test_s_test_with_the_store_equals_s_test_through_autograd():
    model, stored, x, y = _cnn_problem(store=True)
    _, plain, _, _ = _cnn_problem(store=False)
    with analysis_mode(model):
        test = stored.gradients((x[:4], y[:4]))
        a, b = stored.solve(test), plain.solve(test)
    assert stored.products.stored() is not None and plain.products.stored() is None
    assert a.info.iterations == b.info.iterations and abs(a.info.residual - b.info.residual) < 1e-3
    assert _relative(a.vectors, b.vectors) < 1e-3
    assert abs(a.info.damping - b.info.damping) < 1e-4 * b.info.damping


def test_no_store_over_the_budget_or_for_the_hessian():
    model, problem, _, _ = _cnn_problem()
    with analysis_mode(model), torch.enable_grad():
        assert build_output_jacobian(problem.loss, problem.params, problem.train_loader, problem.device,
                                     problem.products.autograd, budget=1000) is None
    x, y = digits(torch.float32)
    hessian = InfluenceProblem(model, cross_entropy_per_example, DataLoader(TensorDataset(x[:100], y[:100])), 0.1,
                               LissaConfig(), curvature="hessian")
    assert hessian.products.stored() is None


def test_a_loss_the_split_cannot_handle_keeps_the_autograd_products():
    model, _, x, y = _cnn_problem()

    def twice(m, batch):  # calls the model twice: no single output to split the loss at
        return F.cross_entropy(m(batch[0]) + 0 * m(batch[0]), batch[1], reduction="none")

    problem = InfluenceProblem(model, twice, DataLoader(TensorDataset(x[:100], y[:100]), batch_size=50), 0.1,
                               LissaConfig(depth=5))
    with analysis_mode(model):
        assert problem.products.stored() is None
