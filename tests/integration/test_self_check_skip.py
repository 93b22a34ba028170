"""damping='self_check' on a model and training set too large for its candidates' solves: skipped (also under
``strict``), the analysis falls back on damping='auto', and the solve record says what it did."""

from __future__ import annotations

import pytest

from lightning_influence.analysis.damping_check import SelfCheckUnaffordable
from lightning_influence.callbacks import _damping_check as callback_check
from lightning_influence.callbacks._damping_check import SkippedCheck, analysis_problem, run_damping_check, with_check
from lightning_influence.config import DEFAULT_DAMPING, SELF_CHECK_DAMPING, ProblemConfig
from lightning_influence.results import SolveInfo


@pytest.mark.parametrize("strict", [False, True])
def test_an_unaffordable_self_check_is_skipped_and_recorded(monkeypatch, strict):
    def unaffordable(*args, **kwargs):
        raise SelfCheckUnaffordable("damping='self_check' is too costly here: x.", "solving would take 300x")

    monkeypatch.setattr(callback_check, "_damping_check", unaffordable)
    with pytest.warns(UserWarning, match="self_check skipped at epoch 3"):
        check = run_damping_check(None, None, None, None, None, ProblemConfig(), "train", 3, strict=strict)
    assert check == SkippedCheck("solving would take 300x", 3)

    class Trainer:
        optimizers: list = []

    problem = analysis_problem(ProblemConfig(damping=SELF_CHECK_DAMPING, weight_decay=0.0), Trainer(), check)
    assert problem.damping == DEFAULT_DAMPING
    info = with_check(SolveInfo("lissa", 0.5, True, 1.0, damping_requested="auto",
                                damping_rule="auto: 0.03 x lambda_max (16.7)", warnings=("earlier",)), check)
    assert info.damping_requested == SELF_CHECK_DAMPING and info.damping_check is None
    assert info.damping_rule == ("self_check skipped at epoch 3 (solving would take 300x); damping='auto' instead:"
                                 " auto: 0.03 x lambda_max (16.7)")
    assert info.warnings[0] == "earlier" and "self_check skipped" in info.warnings[1]


def test_other_failures_still_raise_under_strict(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no optimiser")

    monkeypatch.setattr(callback_check, "_damping_check", broken)
    with pytest.raises(RuntimeError, match="no optimiser"):
        run_damping_check(None, None, None, None, None, ProblemConfig(), "train", 0, strict=True)
    with pytest.warns(UserWarning, match="failed"):
        assert run_damping_check(None, None, None, None, None, ProblemConfig(), "train", 0) is None
