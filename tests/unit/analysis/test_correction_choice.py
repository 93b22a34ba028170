"""The error-correction choices that use what influence knows (#28): the guard, influence weights, the lr search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence.analysis.correction import anchor_weight, guarded_top, influence_weights
from lightning_influence.analysis.correction_lr import LR_GRID, search_lr


def test_guarded_top_takes_the_most_helpful_of_the_examples_that_do_not_hurt_the_guard():
    indices = torch.tensor([5, 3, 9, 1])
    scores = torch.tensor([[-3.0, -2.0, -1.0, -4.0],    # influence on the anchors (negative = helpful)
                           [0.5, -0.1, -0.2, 0.1]])     # influence on the guard (positive = raises its loss)
    chosen, influence = guarded_top(indices, scores, 3)
    # 3 and 9 pass the guard (most helpful first); then the rest by the summed influence: 1 (-3.9) before 5 (-2.5)
    assert chosen == [3, 9, 1]
    assert influence == [-2.0, -1.0, -4.0]
    assert guarded_top(indices, scores, 4)[0] == [3, 9, 1, 5]


def test_guarded_top_by_guard_swaps_the_roles_and_reports_the_anchor_influence():
    indices = torch.tensor([5, 3, 9, 1])
    scores = torch.tensor([[-3.0, 0.2, -1.0, -0.5],    # influence on the anchors
                           [-0.1, -5.0, -0.3, -0.2]])  # influence on the guard
    # 3 hurts the anchors (0.2 > 0): out, although best for the guard; then 9, 1, 5 by their help to the guard
    chosen, influence = guarded_top(indices, scores, 3, by_guard=True)
    assert chosen == [9, 1, 5]
    assert influence == [-1.0, -0.5, -3.0]  # the influence on the anchors, as the report keeps it
    assert guarded_top(indices, scores, 4, by_guard=True)[0] == [9, 1, 5, 3]  # then by the sum


def test_guarded_top_does_not_depend_on_the_order_the_shards_came_in():
    generator = torch.Generator().manual_seed(0)
    indices, scores = torch.arange(50), torch.randn(2, 50, generator=generator)
    order = torch.randperm(50, generator=generator)
    assert guarded_top(indices, scores, 7) == guarded_top(indices[order], scores[:, order], 7)
    passing = [i for i in range(50) if scores[1, i] <= 0]
    best = sorted(passing, key=lambda i: float(scores[0, i]))[:7]
    assert guarded_top(indices, scores, 7)[0] == best


def test_influence_weights_follow_helpfulness_with_mean_one():
    assert influence_weights([-3.0, -1.0, 0.0, 2.0]) == pytest.approx([3.0, 1.0, 0.0, 0.0])
    weights = influence_weights([-0.2, -0.6, -0.2])
    assert weights == pytest.approx([0.6, 1.8, 0.6]) and sum(weights) == pytest.approx(3.0)
    assert influence_weights([0.5, 1.0]) == [1.0, 1.0]  # nothing helpful: equal weights


class Quadratic(nn.Module):
    """Per-example loss 0.5 * curvature * w^2 (one weight): SGD's Armijo step bound is exactly 1 / curvature."""

    def __init__(self, curvature: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.curvature = curvature

    def per_example_loss(self, batch):
        return 0.5 * self.curvature * (self.w * batch[0]).pow(2).sum(1)


def loss_fn(model, batch):
    return model.per_example_loss(batch)


@pytest.mark.parametrize("curvature", [5.0, 20.0, 0.3])
def test_sgd_line_search_picks_the_largest_grid_step_below_one_over_the_curvature(curvature):
    model = Quadratic(curvature)
    batch = (torch.ones(4, 1, dtype=torch.float64),)
    lr, trials = search_lr(model, loss_fn, batch, 4, "sgd")
    # one SGD step from w=1: loss 0.5 c (1 - lr c)^2 <= 0.5 c - 0.5 lr c^2  <=>  lr <= 1/c
    assert lr == max(v for v in LR_GRID if v <= 1 / curvature)
    assert [t[0] for t in trials] == [v for v in LR_GRID if v >= lr]  # largest first, stops at the first pass
    assert trials[-1][1] == pytest.approx(0.5 * curvature * (1 - lr * curvature) ** 2)
    assert float(model.w.detach()) == 1.0 and model.w.grad is None  # the model is left as it was


def test_adam_line_search_uses_adams_own_step():
    """Adam's first step is lr * sign(gradient): on 0.5 c w^2 from w=1 it passes Armijo up to lr = 1, whatever c."""
    for curvature in (0.3, 50.0):
        lr, _ = search_lr(Quadratic(curvature), loss_fn, (torch.ones(2, 1, dtype=torch.float64),), 2, "adam")
        assert lr == 1.0


def test_line_search_explains_a_loss_that_cannot_fall():
    model = Quadratic(1.0)
    with torch.no_grad():
        model.w.zero_()  # already at the minimum: no step lowers the loss
    with pytest.raises(ValueError, match="pass a number as `lr`"):
        search_lr(model, loss_fn, (torch.ones(2, 1, dtype=torch.float64),), 2, "sgd")


def test_anchor_weight_cancels_the_part_of_the_replay_gradient_that_opposes_the_anchors():
    g_anchors = [torch.tensor([2.0, 0.0]), torch.tensor([0.0])]
    # opposing: g_R = (-3, 1); g_A . g_R = -6, |g_A|^2 = 4 -> w = 2.5 and g_R + w g_A = (2, 1): along g_A exactly g_A
    assert anchor_weight(g_anchors, [torch.tensor([-3.0, 1.0]), torch.tensor([5.0])]) == pytest.approx(2.5)
    assert anchor_weight(g_anchors, [torch.tensor([3.0, 1.0]), None]) == 1.0  # no conflict: plain sum
    assert anchor_weight([torch.zeros(2), None], [torch.tensor([-3.0, 1.0]), None]) == 1.0  # anchors fitted
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # the step lowers the anchors' loss at least as fast as g_A alone, to first order
        g_a, g_r = torch.randn(2, 30, generator=generator, dtype=torch.float64)
        w = anchor_weight([g_a], [g_r])
        assert float(g_a @ (g_r + w * g_a)) >= float(g_a @ g_a) * (1 - 1e-12)
        if w > 1:  # and no faster: only the opposing part is cancelled
            assert float(g_a @ (g_r + w * g_a)) == pytest.approx(float(g_a @ g_a))


def test_match_decrease_scales_a_direction_to_the_reference_gradients_first_order_decrease():
    from lightning_influence.analysis.correction_steps import match_decrease

    reference = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)]
    grads = [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64), None]
    scale = match_decrease(grads, reference + [None])
    assert scale == pytest.approx(9.0 / 5.0)  # |r|^2 = 9, r . g = 3 + 2 = 5
    assert float(sum((a * b).sum() for a, b in zip(grads, reference))) == pytest.approx(9.0)
    opposed = [torch.tensor([-1.0, 0.0], dtype=torch.float64)]
    assert match_decrease(opposed, reference[:1]) == 1.0 and opposed[0].tolist() == [-1.0, 0.0]  # no positive scale


def test_project_each_is_the_closest_step_that_raises_no_protect_examples_loss():
    """GEM's projection: afterwards g_i . d >= 0 for every example gradient g_i, d - g = sum_i v_i g_i with v >= 0
    and v_i = 0 where the constraint is slack (the KKT conditions of min |d - g|^2, so d is the closest such step);
    a step that already satisfies every constraint is left alone."""
    from lightning_influence.analysis.correction_steps import project_each

    generator = torch.Generator().manual_seed(0)
    g = torch.randn(12, generator=generator, dtype=torch.float64)
    rows = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    rows[:3] -= 0.8 * g  # the first three oppose the step
    grads = [g[:5].clone().reshape(5, 1), None, g[5:].clone()]
    each = [(r[:5].reshape(5, 1), None, r[5:]) for r in rows]
    cosine = project_each(grads, each, sweeps=2000)
    d = torch.cat([grads[0].flatten(), grads[2]])
    assert cosine < 0 and float((rows @ g).min()) < 0
    assert float((rows @ d).min()) >= -1e-8
    v = torch.linalg.lstsq(rows.T, d - g).solution  # the multipliers (rows are independent)
    torch.testing.assert_close(rows.T @ v, d - g, atol=1e-8, rtol=0)
    assert float(v.min()) >= -1e-6
    slack = (rows @ d) > 1e-6
    assert all(abs(float(x)) <= 1e-6 for x in v[slack])
    fine = [g.clone()]
    assert project_each(fine, [(r.clone(),) for r in rows[3:] if float(r @ g) >= 0]) >= 0
    torch.testing.assert_close(fine[0], g)
