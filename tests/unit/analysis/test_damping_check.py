"""damping='self_check': retrainings on random halves, the LDS of each candidate damping, the choice."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import cross_entropy_per_example, digits, loader
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.analysis.damping_check import (
    check_damping,
    check_points,
    datamodeling_score,
    half_masks,
    retrain_on_halves,
    spearman_columns,
)
from lightning_influence.config import ExactConfig, ProblemConfig
from lightning_influence.core.tensors.data import IndexedData


@pytest.fixture(scope="module")
def adam_mlp():
    """A ReLU MLP after 4 epochs of Adam without weight decay on 300 digits: not converged."""
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    x = x.flatten(1)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):
        for idx in torch.randperm(300).split(32):
            optimizer.zero_grad()
            cross_entropy_per_example(model, (x[idx], y[idx])).mean().backward()
            optimizer.step()
    return model, TensorDataset(x[:300], y[:300]), (x[1500:1512], y[1500:1512])


def test_spearman_columns_match_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    predicted = torch.randn(12, 4, generator=g, dtype=torch.float64)
    actual = torch.randint(0, 4, (12, 4), generator=g).double()  # many ties
    ours = spearman_columns(predicted, actual)
    for col in range(4):
        assert float(ours[col]) == pytest.approx(spearmanr(predicted[:, col], actual[:, col])[0], abs=1e-12)


def test_the_score_of_an_exact_linear_model_is_one():
    """Losses that are exactly a constant plus the sum of kept influences: LDS 1; negated: -1."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=g, dtype=torch.float64)
    masks = half_masks(40, 15, seed=5)
    assert masks.sum(1).eq(20).all() and not torch.equal(masks[0], masks[1])
    losses = 2.0 + masks.double() @ scores.T
    assert torch.allclose(datamodeling_score(scores, masks, losses), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(datamodeling_score(-scores, masks, losses), -torch.ones(3, dtype=torch.float64))


def test_retraining_leaves_the_model_as_it_was_and_repeats_exactly(adam_mlp):
    model, train, check = adam_mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.eval()

    def adam(params):
        return torch.optim.Adam(params, lr=0.01)

    first = retrain_on_halves(model, cross_entropy_per_example, IndexedData(train), check, adam, epochs=1, count=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not model.training
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    again = retrain_on_halves(model, cross_entropy_per_example, IndexedData(train), check, adam, epochs=1, count=3)
    assert torch.equal(first.losses, again.losses) and torch.equal(first.masks, again.masks)
    assert first.losses.shape == (3, 12) and first.epochs == 1
    assert not torch.allclose(first.losses[0], first.losses[1])  # different halves, different models
    with torch.no_grad():
        start = cross_entropy_per_example(model, check).double()
    assert not torch.allclose(first.losses[0], start)  # the retraining moved the weights


def test_the_choice_is_the_candidate_whose_exact_influence_best_predicts_the_retrainings(adam_mlp):
    model, train, check = adam_mlp
    data = IndexedData(train)
    retrainings = retrain_on_halves(model, cross_entropy_per_example, data, check,
                                    lambda params: torch.optim.Adam(params, lr=0.01), epochs=2, count=8)
    candidates = (1e-3, 1e-2, 1e-1, 1.0)
    found = check_damping(model, cross_entropy_per_example, data, check, retrainings, ProblemConfig(),
                          candidates=candidates)
    expected = []
    for damping in candidates:  # the public API's exact solve at each damping, scored apart
        scores = li.influence(model, cross_entropy_per_example, loader(*train.tensors, 100), check,
                              problem=ProblemConfig(solver=ExactConfig(), damping=damping))
        expected.append(float(datamodeling_score(scores, retrainings.masks, retrainings.losses).mean()))
    assert found.lds == pytest.approx(tuple(expected), abs=1e-6)
    assert found.chosen == candidates[max(range(len(candidates)), key=lambda i: expected[i])]
    assert max(expected) - min(expected) > 0.02  # the candidates really differ: the choice is not a tie-break
    assert found.points == 12 and found.retrainings == 8 and found.epochs == 2
    assert "self_check" in found.rule and f"{found.chosen:g}" in found.rule


def test_self_check_is_for_the_callbacks_and_says_how_to_use_it_elsewhere(adam_mlp):
    model, train, check = adam_mlp
    with pytest.raises(ValueError, match="check_damping_by_retraining"):
        li.s_test(model, cross_entropy_per_example, loader(*train.tensors, 100), check, damping="self_check")


def test_the_public_self_check_is_the_pieces_in_order_and_leaves_the_model_and_rng_alone(adam_mlp):
    model, train, check = adam_mlp
    adam = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    found = li.check_damping_by_retraining(model, cross_entropy_per_example, loader(*train.tensors, 32), check,
                                           adam, epochs=1, retrainings=4, candidates=(1e-2, 1.0))
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # the global RNG is where the call found it
    data = IndexedData(train)
    pieces = check_damping(model, cross_entropy_per_example, data, check,
                           retrain_on_halves(model, cross_entropy_per_example, data, check, adam, epochs=1, count=4,
                                             batch_size=32), ProblemConfig(), candidates=(1e-2, 1.0))
    assert found.lds == pytest.approx(pieces.lds, abs=1e-9) and found.chosen == pieces.chosen
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="fresh optimiser"):
        li.check_damping_by_retraining(model, cross_entropy_per_example, loader(*train.tensors, 32), check,
                                       torch.optim.Adam(model.parameters()), epochs=1)


def test_check_points_sample_the_validation_set_reproducibly():
    assert check_points(10, points=32) == list(range(10))
    picked = check_points(500, points=32, seed=3)
    assert len(set(picked)) == 32 and picked == sorted(picked) and picked == check_points(500, points=32, seed=3)
    assert not math.isnan(sum(picked))


def test_large_model_path_solves_within_the_budget_and_agrees_with_the_dense_path(adam_mlp, monkeypatch):
    from lightning_influence.analysis import damping_check

    model, train, check = adam_mlp
    data = IndexedData(train)
    retrainings = retrain_on_halves(model, cross_entropy_per_example, data, check,
                                    lambda params: torch.optim.Adam(params, lr=0.01), epochs=2, count=8)
    candidates = (1e-2, 1e-1, 1.0)
    dense = check_damping(model, cross_entropy_per_example, data, check, retrainings, ProblemConfig(),
                          candidates=candidates)
    monkeypatch.setattr(damping_check, "EXACT_CHECK_PARAMETERS", 0)  # the conjugate-gradient path of large models
    iterative = check_damping(model, cross_entropy_per_example, data, check, retrainings, ProblemConfig(),
                              candidates=candidates)
    assert iterative.chosen == dense.chosen
    assert iterative.lds == pytest.approx(dense.lds, abs=0.02)
    # a curvature product that the budget cannot afford: an error that says what to pass instead
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_BUDGET", 1e-9)
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_FLOOR_SECONDS", 0.0)
    with pytest.raises(RuntimeError, match="damping='auto'") as raised:
        check_damping(model, cross_entropy_per_example, data, check, retrainings, ProblemConfig(),
                      candidates=candidates)
    assert "retrainings' time" in str(raised.value) and f"{sum(p.numel() for p in model.parameters()):,}" in str(
        raised.value)


def test_the_precheck_stops_an_unaffordable_check_before_retraining_and_leaves_the_model_alone(adam_mlp, monkeypatch):
    from lightning_influence.analysis import damping_check
    from lightning_influence.analysis.damping_check import precheck_affordable

    model, train, check = adam_mlp
    data = IndexedData(train)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.train()
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_BUDGET", 1e-9)
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_FLOOR_SECONDS", 0.0)
    precheck_affordable(model, cross_entropy_per_example, data, check, ProblemConfig(), epochs=1, batch_size=32)
    # ^ small enough for the dense solves: nothing to check, whatever the budget
    monkeypatch.setattr(damping_check, "EXACT_CHECK_PARAMETERS", 0)  # the conjugate-gradient path of large models
    with pytest.raises(RuntimeError, match="damping='auto'"):
        precheck_affordable(model, cross_entropy_per_example, data, check, ProblemConfig(), epochs=1, batch_size=32)
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_BUDGET", 4.0)
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_FLOOR_SECONDS", 60.0)
    precheck_affordable(model, cross_entropy_per_example, data, check, ProblemConfig(), epochs=1, batch_size=32)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all((p.grad is None and g is None) or torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_the_candidates_share_one_stored_jacobian_and_the_budget_times_its_product(adam_mlp, monkeypatch):
    """On the conjugate-gradient path the candidates' solves take their products from one stored output Jacobian,
    built once (each candidate's own problem used to build its own), and the budget is timed on a product from that
    store, the form the solves use (timing autograd's product instead refused the tiny BERT example's check)."""
    from lightning_influence.analysis import damping_check
    from lightning_influence.core.curvature import jacobian, training
    from lightning_influence.core.curvature.jacobian import RowBatch
    from lightning_influence.core.problem import InfluenceProblem

    model, train, check = adam_mlp
    data = IndexedData(train)
    retrainings = retrain_on_halves(model, cross_entropy_per_example, data, check,
                                    lambda params: torch.optim.Adam(params, lr=0.01), epochs=1, count=6)
    monkeypatch.setattr(damping_check, "EXACT_CHECK_PARAMETERS", 0)
    monkeypatch.setattr(jacobian, "TIMED", False)  # store whatever the speed probe would say on this tiny model
    builds, timed = [], []
    original_build, original_product = training.build_output_jacobian, InfluenceProblem.minibatch_hvp

    def counted_build(*args, **kwargs):
        builds.append(1)
        return original_build(*args, **kwargs)

    def recorded_product(self, batch, vectors):
        timed.append(type(batch))
        return original_product(self, batch, vectors)

    monkeypatch.setattr(training, "build_output_jacobian", counted_build)
    monkeypatch.setattr(InfluenceProblem, "minibatch_hvp", recorded_product)
    found = check_damping(model, cross_entropy_per_example, data, check, retrainings, ProblemConfig(),
                          candidates=(1e-2, 1e-1, 1.0))
    assert len(builds) == 1
    assert timed[:2] == [RowBatch, RowBatch]  # the budget's two timed products, from the store
    assert all(math.isfinite(v) for v in found.lds)


def test_a_problem_with_other_settings_shares_the_products_only_when_they_are_the_same(adam_mlp):
    from lightning_influence.config import CGConfig
    from lightning_influence.core.problem import InfluenceProblem

    model, train, _ = adam_mlp
    loader_ = torch.utils.data.DataLoader(train, batch_size=64)
    base = InfluenceProblem(model, cross_entropy_per_example, loader_, ProblemConfig(damping=0.1, solver=CGConfig()))
    same = base.with_settings(ProblemConfig(damping=1.0, solver=CGConfig(preconditioner="kfac")))
    assert same.products is base.products and same.damping == 1.0 and base.damping == 0.1
    for other in (ProblemConfig(damping=1.0, solver=CGConfig(), curvature="hessian"),
                  ProblemConfig(damping=1.0, solver=CGConfig(), dtype="float32"),
                  ProblemConfig(damping=1.0, solver=ExactConfig())):
        assert base.with_settings(other).products is not base.products


def test_the_precheck_times_a_few_vectors_and_scales_them_to_all(adam_mlp, monkeypatch):
    """The precheck times its product on ``PRECHECK_PROBE_VECTORS`` of the check points' gradients and scales the
    time to the whole count: an unaffordable budget still refuses, and the refusal names every check point."""
    from lightning_influence.analysis import damping_check
    from lightning_influence.analysis.damping_check import PRECHECK_PROBE_VECTORS, precheck_affordable
    from lightning_influence.core.problem import InfluenceProblem

    model, train, check = adam_mlp
    rows = []
    original = InfluenceProblem.minibatch_hvp

    def recorded(self, batch, vectors):
        rows.append(vectors.shape[0])
        return original(self, batch, vectors)

    monkeypatch.setattr(InfluenceProblem, "minibatch_hvp", recorded)
    monkeypatch.setattr(damping_check, "EXACT_CHECK_PARAMETERS", 0)
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_BUDGET", 1e-9)
    monkeypatch.setattr(damping_check, "SELF_CHECK_SOLVE_FLOOR_SECONDS", 0.0)
    with pytest.raises(RuntimeError, match=f"for its {len(check[0])} check points"):
        precheck_affordable(model, cross_entropy_per_example, IndexedData(train), check, ProblemConfig(), epochs=1,
                            batch_size=32)
    assert rows == [PRECHECK_PROBE_VECTORS, PRECHECK_PROBE_VECTORS] and PRECHECK_PROBE_VECTORS < len(check[0])
