"""Self-diagnosis (residuals, repeat agreement, warnings), its report output, and leave-one-out checks."""

from __future__ import annotations

import json
import math

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
)
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.analysis.diagnostics import (
    correlations,
    gradient_ratio,
    setting_warnings,
    structure_warnings,
)
from lightning_influence.analysis.explain import explain
from lightning_influence.config import CGConfig, ExactConfig, ExplainConfig, LissaConfig, ProblemConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers import make_solver
from lightning_influence.core.solvers.neumann import SCALE_MARGIN
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.collectives import SingleProcess
from lightning_influence.distributed.solve import solve_s_test_with_halves
from lightning_influence.reporting import InfluenceReport, SolverSummary, report_to_dict, write_report
from lightning_influence.results import PointTrust, SolveInfo, TrustReport, TrustWarning


@pytest.fixture(scope="module")
def logistic():
    """Logistic regression at the exact optimum of ``mean CE + l2/2 ||theta||^2`` (float64)."""
    x, y = digits(torch.float64)
    torch.manual_seed(0)
    model = LogisticRegression().double()
    fit_newton(model, x[:200], y[:200], l2=0.05)
    return model, TensorDataset(x[:200], y[:200]), TensorDataset(x[1500:1540], y[1500:1540])


def test_exact_solve_has_zero_residual_and_lissa_a_small_one_matching_the_materialised_hessian(logistic):
    model, train, val = logistic
    data = IndexedData(train, batch_size=64)
    exact = explain(model, cross_entropy_per_example, data, IndexedData(val), ProblemConfig(solver=ExactConfig(), damping=0.05),
                    ExplainConfig(top_k=5, num_worst=3))
    assert exact.trust.residual_examples == 200  # the whole training set: below SUBSET_EXAMPLES
    assert all(p.residual < 1e-8 for p in exact.trust.points)
    assert all(p.repeat_pearson is None for p in exact.trust.points)  # a deterministic solver has no repeats

    problem = InfluenceProblem(model, cross_entropy_per_example, data.loader(), 0.05, LissaConfig(depth=60, repeats=2))
    v = problem.gradients(val[:2])
    x = problem.solve(v).vectors
    from lightning_influence.core.curvature.hvp import hessian

    matrix = hessian(problem.loss, problem.params, data.loader()) + 0.05 * torch.eye(problem.num_params).double()
    expected = (x @ matrix - v).norm(dim=1) / v.norm(dim=1)
    measured = problem.residual(x, v)  # the solver's own check: logistic regression, GGN = Hessian
    torch.testing.assert_close(measured, expected, rtol=1e-6, atol=1e-10)
    assert bool((measured > 1e-4).all()) and bool((measured < 0.5).all())  # a truncated recursion: inexact, close


class CountingCollectives(SingleProcess):
    def __init__(self) -> None:
        self.summed: list[torch.Size] = []

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.summed.append(tensor.shape)
        return tensor


def test_repeat_halves_are_even_and_odd_repeats_and_travel_in_one_all_reduce(logistic):
    model, train, val = logistic
    config = LissaConfig(depth=30, repeats=5, batch_size=16, refine=False)  # the repeats as they are
    problem = InfluenceProblem(model, cross_entropy_per_example, IndexedData(train).loader(), 0.05, config)
    v = problem.gradients(val[:3])
    collectives = CountingCollectives()
    vectors, info, (even, odd) = solve_s_test_with_halves(problem, v, collectives, None)
    # one collective for both halves, then one for the residual check's split product (3 vectors + the count)
    assert collectives.summed == [torch.Size([2, 3, problem.num_params]), torch.Size([3 * problem.num_params + 1])]
    torch.testing.assert_close(even, problem.solver.partial(v, [0, 2, 4])[0] / 3)
    torch.testing.assert_close(odd, problem.solver.partial(v, [1, 3])[0] / 2)
    torch.testing.assert_close(vectors, problem.solve(v).vectors)
    assert info.trace.shape[0] == 5
    single = LissaConfig(depth=30, repeats=1, batch_size=16)
    problem = InfluenceProblem(model, cross_entropy_per_example, IndexedData(train).loader(), 0.05, single)
    assert solve_s_test_with_halves(problem, v, SingleProcess(), None)[2] is None


def test_repeat_agreement_is_the_correlation_of_the_top_k_scores_of_the_two_halves(logistic):
    model, train, val = logistic
    data = IndexedData(train)
    config = LissaConfig(depth=100, repeats=4, batch_size=32, refine=False)  # the repeats' own halves
    result = explain(model, cross_entropy_per_example, data, IndexedData(val), ProblemConfig(solver=config, damping=0.05),
                     ExplainConfig(top_k=6, num_worst=2))
    problem = InfluenceProblem(model, cross_entropy_per_example, data.loader(), 0.05, config)
    v = problem.gradients(val[[p.val_index for p in result.points]])
    even = problem.solver.partial(v, [0, 2])[0] / 2
    odd = problem.solver.partial(v, [1, 3])[0] / 2
    for row, (point, trust) in enumerate(zip(result.points, result.trust.points)):
        indices = sorted({i.train_index for i in (*point.harmful, *point.helpful)})
        g = problem.gradients(train[indices])
        a, b = (-(g @ even[row])).numpy(), (-(g @ odd[row])).numpy()
        assert trust.repeat_pearson == pytest.approx(pearsonr(a, b)[0], abs=1e-6)
        assert trust.repeat_spearman == pytest.approx(spearmanr(a, b)[0], abs=1e-6)
        assert trust.repeat_spearman > 0.8  # a converged solve: the halves rank alike


def test_correlations_are_undefined_for_constant_or_tiny_inputs():
    assert correlations(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])) == (None, None)
    assert correlations(torch.ones(5), torch.arange(5.0)) == (None, None)
    pearson, spearman = correlations(torch.arange(5.0), torch.tensor([0.0, 1, 4, 9, 16]))
    assert spearman == pytest.approx(1.0) and 0.9 < pearson < 1.0


def test_gradient_ratio_is_tiny_at_the_optimum_and_large_at_initialisation(logistic):
    model, train, _ = logistic
    data = IndexedData(train)
    problem = InfluenceProblem(model, cross_entropy_per_example, data.loader(), 0.05, ExactConfig())
    assert gradient_ratio(problem, data, range(200), weight_decay=0.05) < 1e-6  # grad R + l2 theta = 0 at the optimum
    assert gradient_ratio(problem, data, range(200), weight_decay=0.0) > 0.01  # without the L2 term it is not
    torch.manual_seed(0)
    fresh = LogisticRegression().double()
    fresh_problem = InfluenceProblem(fresh, cross_entropy_per_example, data.loader(), 0.05, ExactConfig())
    assert gradient_ratio(fresh_problem, data, range(200)) > 0.1
    result = explain(fresh, cross_entropy_per_example, data, IndexedData(val_of(train)),
                     ProblemConfig(solver=CGConfig(), damping=0.05, weight_decay=0.05), ExplainConfig(top_k=3, num_worst=1))
    assert "model_not_converged" in {w.code for w in result.trust.warnings}


def val_of(train: TensorDataset) -> TensorDataset:
    return TensorDataset(train.tensors[0][:10], train.tensors[1][:10])


def test_structure_warnings_name_batchnorm_dropout_depth_and_width():
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    assert structure_warnings(plain) == []
    normed = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 2))
    (warning,) = structure_warnings(normed)
    assert warning.code == "batchnorm_dropout" and warning.severity == "info"
    assert "BatchNorm1d" in warning.message and "Dropout" in warning.message and "eval mode" in warning.message
    deep = nn.Sequential(*[nn.Linear(4, 4) for _ in range(9)])
    assert [w.code for w in structure_warnings(deep)] == ["deep_model"]
    deep[0].weight.requires_grad_(False)  # frozen layers are not analysed
    assert structure_warnings(deep) == []
    assert [w.code for w in structure_warnings(nn.Linear(4, 2048))] == ["wide_model"]


def test_setting_warnings_say_which_knob_to_turn():
    converged = SolveInfo("lissa", 0.0, converged=True, seconds=0.0)

    def codes(info=converged, damping=0.01, weight_decay=None):
        return [w.code for w in setting_warnings(info, damping, weight_decay)]

    def solver_codes(config, top=None):  # the solver's own settings: asked of the solver object
        return [w.code for w in make_solver(config, None).trust_warnings(top)]  # type: ignore[arg-type]

    assert codes() == []
    assert codes(damping=0.0) == ["no_damping"]
    assert codes(weight_decay=0.0) == ["no_weight_decay"]
    assert codes(damping=1e-4, weight_decay=1e-3) == ["damping_below_weight_decay"]
    assert solver_codes(CGConfig()) == []
    assert solver_codes(LissaConfig(scale=2.0), top=5.0) == ["scale_below_top_eigenvalue"]
    assert solver_codes(LissaConfig(scale=SCALE_MARGIN * 5.0), top=5.0) == []
    assert solver_codes(LissaConfig(batch_size=2)) == ["small_lissa_batch"]
    assert codes(info=SolveInfo("cg", 0.01, 0.0, False)) == ["not_converged"]
    message = make_solver(LissaConfig(scale=2.0), None).trust_warnings(5.0)[0].message
    assert "scale='auto'" in message and f"{SCALE_MARGIN * 5.0:.3g}" in message  # the fix: auto, or what auto uses


def test_a_damping_the_self_check_chose_below_the_weight_decay_is_a_note_not_a_warning():
    """The self-check measured its damping against retrainings with the training's weight decay: the rule of thumb
    "damping >= weight decay" becomes an info note naming the candidates; the other warnings stay as they were."""
    from lightning_influence.callbacks._damping_check import with_checked_trust
    from lightning_influence.results import DampingCheck

    info = SolveInfo("lissa", 1e-3, converged=True, seconds=0.0)
    trust = TrustReport((), tuple(setting_warnings(info, 1e-3, 1e-2)) + (TrustWarning("deep_model", "deep"),))
    check = DampingCheck(chosen=1e-3, candidates=(1e-4, 1e-3, 1e-2), lds=(0.5, 0.7, 0.6), points=8, retrainings=10,
                         epochs=1, seconds=1.0)
    assert [w.severity for w in trust.warnings] == ["warning", "warning"]
    checked = with_checked_trust(trust, check)
    assert [(w.code, w.severity) for w in checked.warnings] == [("damping_below_weight_decay", "info"),
                                                               ("deep_model", "warning")]
    assert "self-check" in checked.warnings[0].message and "[0.0001, 0.001, 0.01]" in checked.warnings[0].message
    assert with_checked_trust(trust, None) is trust  # a damping the user chose keeps the warning


def test_divergence_prone_lissa_is_flagged_end_to_end():
    x, y = digits(torch.float64)
    torch.manual_seed(0)
    model = SmallCNN().double()
    fit_adam(model, x[:150], y[:150], 1e-3, epochs=30)
    # top eigenvalue here: about 0.38; no CG finish, so the fragile recursion's own miss shows
    config = LissaConfig(depth=5, repeats=2, batch_size=4, scale=0.1, refine=False)
    result = explain(model, cross_entropy_per_example, IndexedData(TensorDataset(x[:150], y[:150])),
                     IndexedData(TensorDataset(x[1500:1520], y[1500:1520])),
                     ProblemConfig(solver=config, damping=1e-3, weight_decay=1e-3), ExplainConfig(top_k=5, num_worst=2))
    codes = {w.code for w in result.trust.warnings}
    assert {"small_lissa_batch", "scale_below_top_eigenvalue", "not_converged"} <= codes
    assert result.trust.top_eigenvalue > 0.1


def _report(trust: TrustReport) -> InfluenceReport:
    return InfluenceReport(epoch=2, global_step=40, stage="validation", train_size=100, points=(),
                           solver=SolverSummary("lissa", 0.01, True, 1.0), trust=trust)


def test_trust_is_written_to_json_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    trust = TrustReport(
        points=(PointTrust(3, 0.02, 0.9, 0.8), PointTrust(7, None)),
        warnings=(TrustWarning("no_damping", "set damping"), TrustWarning("batchnorm_dropout", "eval", "info")),
        residual_examples=100, gradient_ratio=0.01, gradient_examples=100, top_eigenvalue=4.0,
    )
    record = json.loads(json.dumps(report_to_dict(_report(trust))))
    assert record["trust"]["points"] == [
        {"val_index": 3, "residual": 0.02, "repeat_pearson": 0.9, "repeat_spearman": 0.8},
        {"val_index": 7, "residual": None, "repeat_pearson": None, "repeat_spearman": None},
    ]
    assert [w["code"] for w in record["trust"]["warnings"]] == ["no_damping", "batchnorm_dropout"]
    assert record["trust"]["top_eigenvalue"] == 4.0 and record["trust"]["residual_examples"] == 100
    assert "trust" not in report_to_dict(_report(None))

    writer = SummaryWriter(str(tmp_path))
    write_report(writer, _report(trust))
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"influence/trust/val_3/residual", "influence/trust/val_3/repeat_spearman", "influence/trust/gradient_ratio",
            "influence/trust/top_eigenvalue", "influence/trust/warning_count"} <= scalars
    assert not [t for t in scalars if t.startswith("influence/trust/val_7/")]
    assert events.Scalars("influence/trust/warning_count")[0].value == 1.0  # the info line is not a warning
    assert "influence/trust/warnings/text_summary" in events.Tags()["tensors"]


def test_leave_one_out_matches_an_independent_newton_refit(logistic):
    model, train, val = logistic
    test = (val.tensors[0][:1], val.tensors[1][:1])
    check = li.verify_leave_one_out(model, cross_entropy_per_example, train, test, num_points=6, steps=15,
                                    solver="exact", damping=0.05)
    assert len(check.train_indices) == 6 and check.train_size == 200
    scores = li.influence(model, cross_entropy_per_example, loader(*train.tensors), test, solver="exact", damping=0.05)[0]
    assert list(check.train_indices) == scores.abs().topk(6).indices.tolist()
    torch.testing.assert_close(check.predicted, -scores[list(check.train_indices)].double() / 200)
    x, y = train.tensors
    base = float(cross_entropy_per_example(model, test)[0].detach())  # the analysed weights are the optimum already
    for index, actual in zip(check.train_indices[:2], check.actual[:2].tolist()):
        weights = torch.ones(200, dtype=torch.float64)
        weights[index] = 0
        refit = _newton_without(model, x, y, weights)
        expected = float(cross_entropy_per_example(refit, test)[0].detach()) - base
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert check.pearson > 0.95 and check.spearman > 0.8  # a convex model: influence predicts removal well
    assert math.isclose(check.base_test_loss, base, rel_tol=1e-8)


def _newton_without(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> nn.Module:
    refit = LogisticRegression().double()
    refit.load_state_dict(model.state_dict())
    return fit_newton(refit, x, y, 0.05, weights=weights, steps=30)


def test_leave_one_out_rejects_bad_arguments(logistic):
    model, train, val = logistic
    test = (val.tensors[0][:1], val.tensors[1][:1])
    with pytest.raises(ValueError, match="exactly one example"):
        li.verify_leave_one_out(model, cross_entropy_per_example, train, val[:2], num_points=2)
    with pytest.raises(ValueError, match=r"num_points.*\[1, 200\]"):
        li.verify_leave_one_out(model, cross_entropy_per_example, train, test, num_points=500)
    with pytest.raises(ValueError, match="distinct training indices"):
        li.verify_leave_one_out(model, cross_entropy_per_example, train, test, train_indices=[1, 1])
    with pytest.raises(ValueError, match="one influence per train index"):
        li.verify_leave_one_out(model, cross_entropy_per_example, train, test, train_indices=[1, 2], influences=[0.1])
    with pytest.raises(ValueError, match="steps"):
        li.verify_leave_one_out(model, cross_entropy_per_example, train, test, steps=0)


def test_a_failing_diagnosis_is_reported_and_the_analysis_kept(logistic, monkeypatch):
    import lightning_influence.analysis.diagnostics as trust_module

    model, train, val = logistic

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the gradient pass")

    monkeypatch.setattr(trust_module, "gradient_ratio", broken)
    result = explain(model, cross_entropy_per_example, IndexedData(train), IndexedData(val),
                     ProblemConfig(solver=CGConfig(), damping=0.05), ExplainConfig(top_k=3, num_worst=1))
    assert len(result.points[0].harmful) == 3  # the analysis itself is intact
    (warning,) = result.trust.warnings
    assert warning.code == "diagnosis_failed" and "out of memory" in warning.message and "diagnose=False" in warning.message


def test_points_that_did_not_converge_are_named():
    from lightning_influence.analysis.diagnostics import unconverged_points
    from lightning_influence.results import PointTrust

    points = [PointTrust(4, 0.01), PointTrust(17, 0.2), PointTrust(9, None), PointTrust(30, 0.06)]
    (warning,) = unconverged_points(points, 0.05)
    assert warning.code == "points_not_converged"
    assert "2 of 4" in warning.message and "17 (0.2)" in warning.message and "30 (0.06)" in warning.message
    assert "4 (" not in warning.message
    assert unconverged_points(points[:1], 0.05) == [] and unconverged_points(points, None) == []


def test_an_explanation_keeps_what_the_solve_recorded_beside_the_configured_settings(logistic, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model, train, val = logistic
    # 200 examples at a small damping: LiSSA's route solves by CG from the start, and the report must say so
    found = explain(model, cross_entropy_per_example, IndexedData(train, batch_size=64), IndexedData(val),
                    ProblemConfig(solver=LissaConfig(), damping=1e-3), ExplainConfig(top_k=3, num_worst=2))
    settings = found.solver.settings
    assert settings["depth"] == LissaConfig().depth and settings["route"] == "auto"  # the configuration
    assert settings["solved_by"] == "cg" and settings["refined_iterations"] > 0  # and what the solve did
    assert found.solver.iterations == 0 and found.solver.converged
    writer = SummaryWriter(str(tmp_path))
    write_report(writer, InfluenceReport(0, 0, "validation", len(train), found.points, found.solver))
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "influence/cg_trace/epoch_0/repeat_0" in tags and not [t for t in tags if t.startswith("influence/lissa")]
