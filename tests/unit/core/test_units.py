"""Core building blocks: HVPs, scoring paths, top-k, solver plumbing, errors and model-state handling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LogisticRegression, SmallCNN, cross_entropy_per_example, digits, loader
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_influence as li
from lightning_influence.config import LissaConfig
from lightning_influence.core import InfluenceProblem, StreamingTopK
from lightning_influence.core.curvature.hvp import batch_hvp, hessian
from lightning_influence.core.scoring import iter_scores


@pytest.fixture(scope="module")
def cnn_data():
    torch.manual_seed(0)
    images, labels = digits(torch.float64)
    model = SmallCNN().double()
    return model, images[:120], labels[:120], images[1500:1504], labels[1500:1504]


def test_jvp_and_factored_scoring_equal_per_example_gradient_dot_products(cnn_data):
    model, x, y, _, _ = cnn_data
    problem = InfluenceProblem(model, cross_entropy_per_example, loader(x, y, 50), 0.01, LissaConfig())
    s = torch.randn(5, problem.num_params, dtype=torch.float64)
    by_jvp = torch.cat(list(problem.scores(s, method="jvp", chunk_size=32)), dim=1)
    by_grad = torch.cat(list(problem.scores(s, method="per_example_grad", chunk_size=7)), dim=1)
    by_layers = torch.cat(list(problem.scores(s, method="factored", chunk_size=45)), dim=1)
    explicit = torch.stack([
        -s @ torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))])
        for i in range(len(y))
    ], dim=1)
    assert by_jvp.shape == (5, 120)
    assert ((by_jvp - explicit).norm() / explicit.norm()) <= 1e-5
    assert ((by_grad - explicit).norm() / explicit.norm()) <= 1e-5
    assert ((by_layers - explicit).norm() / explicit.norm()) <= 1e-5


def test_hvp_methods_agree_with_materialised_hessian(cnn_data):
    model, x, y, _, _ = cnn_data
    problem = InfluenceProblem(model, cross_entropy_per_example, loader(x, y, 40), 0.0, LissaConfig())
    batch = (x[:40], y[:40])
    v = torch.randn(3, problem.num_params, dtype=torch.float64)
    double_backward = batch_hvp(problem.loss, problem.params, batch, v, "double_backward")
    forward_over_reverse = batch_hvp(problem.loss, problem.params, batch, v, "forward_over_reverse")
    matrix = hessian(problem.loss, problem.params, [batch])
    torch.testing.assert_close(double_backward, forward_over_reverse, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(double_backward, v @ matrix, rtol=1e-7, atol=1e-9)


def test_streaming_top_k_equals_full_sort():
    torch.manual_seed(1)
    scores = torch.randn(3, 1000)
    top = StreamingTopK(3, 10)
    for start in range(0, 1000, 37):
        top.update(scores[:, start : start + 37], torch.arange(start, min(start + 37, 1000)))
    result = top.result()
    torch.testing.assert_close(result.harmful_scores, scores.topk(10, dim=1).values)
    torch.testing.assert_close(result.harmful_indices, scores.topk(10, dim=1).indices)
    torch.testing.assert_close(result.helpful_scores, scores.topk(10, dim=1, largest=False).values)
    torch.testing.assert_close(result.helpful_indices, scores.topk(10, dim=1, largest=False).indices)


def test_top_influences_matches_influence_matrix(cnn_data):
    model, x, y, xt, yt = cnn_data
    train = loader(x, y, 32)
    full = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=1.0)
    top = li.top_influences(model, cross_entropy_per_example, train, (xt, yt), top_k=5, solver="exact", damping=1.0)
    assert torch.equal(top.harmful_indices, full.topk(5, dim=1).indices)
    assert torch.equal(top.helpful_indices, full.topk(5, dim=1, largest=False).indices)
    assert bool((top.harmful_scores[:, 0] >= top.harmful_scores[:, -1]).all())


def test_lissa_repeats_depend_only_on_seed_and_repeat_index(cnn_data):
    """Splitting repeats over workers (as under DDP) and summing gives the single-run average."""
    model, x, y, xt, yt = cnn_data
    config = LissaConfig(depth=30, repeats=3, batch_size=16, seed=7, refine=False)  # the repeats alone
    problem = InfluenceProblem(model, cross_entropy_per_example, loader(x, y), 0.05, config)
    with li.core.tensors.modes.analysis_mode(model):
        v = problem.gradients((xt, yt))
        full = problem.solve(v).vectors
        part_a, _ = problem.solver.partial(v, [0, 2])
        part_b, _ = InfluenceProblem(model, cross_entropy_per_example, loader(x, y), 0.05, config).solver.partial(v, [1])
    torch.testing.assert_close((part_a + part_b) / 3, full, rtol=1e-10, atol=1e-12)


def test_too_small_scale_raises_a_divergence_error_naming_the_knobs(cnn_data):
    model, x, y, xt, yt = cnn_data
    with pytest.raises(li.LissaDivergenceError, match=r"increase `scale`.*damping"):
        li.s_test(model, cross_entropy_per_example, loader(x, y), (xt, yt), scale=1e-4, depth=200, damping=0.01,
                  max_retries=0, route="recursion")  # the series itself, without recovery: its error is under test


def test_lissa_trace_and_early_stop_are_recorded(cnn_data):
    model, x, y, xt, yt = cnn_data
    # the untrained CNN has lambda_min ~ -0.59: damping 1.0 keeps H + damping I positive definite
    result = li.s_test(model, cross_entropy_per_example, loader(x, y), (xt, yt), depth=200, tol=0.05, damping=1.0,
                       route="recursion")
    assert result.info.trace.shape[0] == 1
    assert result.info.iterations < 200
    assert float(result.info.trace[0, result.info.iterations - 1]) < 0.05
    assert result.info.scale > 0 and result.info.damping == 1.0
    assert torch.isfinite(result.vectors).all()


def test_scalar_loss_gives_a_clear_error(cnn_data):
    model, x, y, xt, yt = cnn_data

    def mean_loss(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    with pytest.raises(ValueError, match=r"per-example losses of shape \[4\].*reduction='none'"):
        li.s_test(model, mean_loss, loader(x, y), (xt, yt), solver="cg")


def test_unknown_option_and_bad_values_are_rejected(cnn_data):
    model, x, y, xt, yt = cnn_data
    with pytest.raises(TypeError, match="Unexpected option.*'deph'.*depth"):
        li.s_test(model, cross_entropy_per_example, loader(x, y), (xt, yt), deph=10)
    with pytest.raises(ValueError, match="Expected `damping`"):
        li.s_test(model, cross_entropy_per_example, loader(x, y), (xt, yt), damping=-1.0)
    with pytest.raises(ValueError, match="Expected `solver`"):
        li.s_test(model, cross_entropy_per_example, loader(x, y), (xt, yt), solver="newton")
    with pytest.raises(ValueError, match="Expected `scale`"):
        li.s_test(model, cross_entropy_per_example, loader(x, y), (xt, yt), scale=0)


class _DictDigits(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def test_dict_batches_give_the_same_influence_as_tuple_batches(cnn_data):
    model, x, y, xt, yt = cnn_data

    def dict_loss(m, batch):
        return F.cross_entropy(m(batch["image"]), batch["label"], reduction="none")

    as_dicts = li.influence(model, dict_loss, DataLoader(_DictDigits(x, y), batch_size=32),
                            {"image": xt, "label": yt}, solver="cg", damping=1.0)
    as_tuples = li.influence(model, cross_entropy_per_example, loader(x, y, 32), (xt, yt), solver="cg", damping=1.0)
    torch.testing.assert_close(as_dicts, as_tuples)


def test_model_state_rng_and_frozen_parameters_are_respected():
    torch.manual_seed(0)
    images, labels = digits(torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 10)).double()
    model[1].weight.requires_grad_(False)
    model.train()
    train = loader(images[:64], labels[:64], 32)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = li.influence(model, cross_entropy_per_example, train, (images[100:102], labels[100:102]),
                         solver="exact", damping=0.1)
    second = li.influence(model, cross_entropy_per_example, train, (images[100:102], labels[100:102]),
                          solver="exact", damping=0.1)
    assert torch.equal(torch.rand(3), expected_next)  # RNG stream untouched
    assert model.training and model[2].training  # mode restored
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    torch.testing.assert_close(first, second)  # dropout off during analysis: deterministic
    problem = InfluenceProblem(model, cross_entropy_per_example, train, 0.1, li.ExactConfig())
    assert problem.num_params == 16 + 16 * 10 + 10  # frozen weight left out


def test_no_trainable_parameters_is_an_error():
    model = LogisticRegression().requires_grad_(False)
    images, labels = digits(torch.float32)
    with pytest.raises(ValueError, match="trainable parameters"):
        li.s_test(model, cross_entropy_per_example, loader(images[:10], labels[:10]), (images[:2], labels[:2]))


def test_self_influence_exact_and_cg_agree_and_are_negative(cnn_data):
    model, x, y, _, _ = cnn_data
    train = loader(x[:40], y[:40], 16)
    exact = li.self_influence(model, cross_entropy_per_example, train, solver="exact", damping=1.0)
    cg = li.self_influence(model, cross_entropy_per_example, train, solver="cg", damping=1.0, tol=1e-10,
                           max_iter=500)
    assert exact.shape == (40,)
    assert bool((exact < 0).all())  # -g^T (H + lambda I)^-1 g < 0 when H + lambda I is positive definite
    torch.testing.assert_close(exact, cg, rtol=1e-5, atol=1e-8)


def test_iter_scores_rejects_bad_chunk_size(cnn_data):
    model, x, y, _, _ = cnn_data
    problem = InfluenceProblem(model, cross_entropy_per_example, loader(x, y), 0.01, LissaConfig())
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_scores(problem.loss, problem.params, [(x, y)], torch.zeros(1, problem.num_params), "jvp", 0))
