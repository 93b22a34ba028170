"""Influence against ground truth: leave-one-out retraining and the exact inverse Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    LogisticRegression,
    SmallCNN,
    cross_entropy_per_example,
    digits,
    fit_adam,
    fit_newton,
    loader,
    objective_hessian,
)
from scipy.stats import pearsonr

import lightning_influence as li

L2 = 1e-3


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(pearsonr(a.double().numpy(), b.double().numpy())[0])


@pytest.fixture(scope="module")
def logistic():
    """Logistic regression on 1,000 digits with L2 1e-3, fit to convergence (float64), and 3 high-loss tests."""
    torch.manual_seed(0)
    images, labels = digits(torch.float64)
    x_train, y_train = images[:1000], labels[:1000]
    x_test, y_test = images[1000:], labels[1000:]
    model = fit_newton(LogisticRegression().double(), x_train, y_train, L2)
    with torch.no_grad():
        test_losses = cross_entropy_per_example(model, (x_test, y_test))
    worst = test_losses.topk(3).indices
    test_batch = (x_test[worst], y_test[worst])
    exact = li.influence(model, cross_entropy_per_example, loader(x_train, y_train), test_batch,
                         solver="exact", damping=L2)
    return model, x_train, y_train, test_batch, exact


def test_exact_influence_predicts_leave_one_out_retraining(logistic):
    """Removing z changes the test loss by about -I(z, z_test)/n: pins the sign and the scaling."""
    model, x_train, y_train, (x_test, y_test), exact = logistic
    n = len(y_train)
    base = cross_entropy_per_example(model, (x_test, y_test)).detach()
    at_optimum = objective_hessian(model, x_train, y_train, L2)
    for point in range(3):
        top = exact[point].abs().topk(40).indices
        predicted, actual = [], []
        for index in top.tolist():
            weights = torch.ones(n, dtype=torch.float64)
            weights[index] = 0.0  # objective (1/n) sum_{i != z} L_i + L2/2 ||theta||^2, warm-started
            retrained = fit_newton(_copy(model), x_train, y_train, L2, weights=weights, steps=20,
                                   fixed_hessian=at_optimum)
            with torch.no_grad():
                after = cross_entropy_per_example(retrained, (x_test[point : point + 1], y_test[point : point + 1]))
            actual.append(float(after[0] - base[point]))
            predicted.append(float(-exact[point, index] / n))
        r = _pearson(torch.tensor(predicted), torch.tensor(actual))
        assert r >= 0.95, f"test point {point}: Pearson {r:.3f} between predicted and actual LOO loss change"
        # the largest predicted changes have the right sign
        assert np.sign(predicted[0]) == np.sign(actual[0])


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    clone = LogisticRegression().double()
    clone.load_state_dict(model.state_dict())
    return clone


def test_lissa_defaults_and_cg_match_exact_on_logistic_regression(logistic):
    model, x_train, y_train, test_batch, exact = logistic
    train = loader(x_train, y_train)
    lissa = li.influence(model, cross_entropy_per_example, train, test_batch, damping=L2)
    cg = li.influence(model, cross_entropy_per_example, train, test_batch, solver="cg", damping=L2)
    for point in range(3):
        assert _pearson(lissa[point], exact[point]) >= 0.99
        assert _pearson(cg[point], exact[point]) >= 0.999


def test_lissa_matches_exact_on_small_cnn():
    """Non-convex, ~2k parameters, tanh, weight decay 1e-3; damping 1e-2 keeps H + lambda I positive definite."""
    torch.manual_seed(0)
    images, labels = digits(torch.float32)
    x_train, y_train = images[:300], labels[:300]
    x_test, y_test = images[1000:1200], labels[1000:1200]
    model = fit_adam(SmallCNN(), x_train, y_train, l2=L2, epochs=150)
    with torch.no_grad():
        worst = cross_entropy_per_example(model, (x_test, y_test)).topk(3).indices
    test_batch = (x_test[worst], y_test[worst])
    train = loader(x_train, y_train, 300)
    exact = li.s_test(model, cross_entropy_per_example, train, test_batch, solver="exact", damping=1e-2)
    assert exact.info.eigenvalue_min + 1e-2 > 0
    lissa = li.s_test(model, cross_entropy_per_example, train, test_batch, damping=1e-2)
    grads = torch.cat([li.core.InfluenceProblem(model, cross_entropy_per_example, train, 1e-2, li.ExactConfig())
                       .gradients(batch) for batch in train])
    for point in range(3):
        r = _pearson(-(grads @ lissa.vectors[point]), -(grads @ exact.vectors[point]))
        assert r >= 0.95, f"point {point}: Pearson {r:.3f}"
