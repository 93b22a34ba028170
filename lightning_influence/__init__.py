"""lightning-influence: influence functions (Koh & Liang 2017) inside PyTorch Lightning training.

The public API and nothing else. Names that need Lightning (the callback, ``correct_errors``) and the
leave-one-out check load on first use, so ``import lightning_influence`` stays cheap.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_influence.analysis.damping_check import check_damping_by_retraining
    from lightning_influence.analysis.leave_one_out import verify_leave_one_out
    from lightning_influence.analysis.training_signals import TrainingSignalRecorder
    from lightning_influence.callbacks.influence import InfluenceCallback
    from lightning_influence.callbacks.mislabel import MislabelCallback
    from lightning_influence.callbacks.training_signals import TrainingSignalsCallback
    from lightning_influence.config import (
        CGConfig,
        CorrectionConfig,
        ExactConfig,
        ExplainConfig,
        LissaConfig,
        LowRankConfig,
        ProblemConfig,
    )
    from lightning_influence.core.curvature import Curvature, register_curvature
    from lightning_influence.core.curvature.damping import DampingRule, register_damping_rule
    from lightning_influence.core.solvers import Solver, register_solver
    from lightning_influence.core.solvers.neumann import LissaDivergenceError
    from lightning_influence.core.trajectory import take_snapshot
    from lightning_influence.correct import correct_errors
    from lightning_influence.functional import influence, s_test, self_influence, top_influences
    from lightning_influence.reporting.views import register_view
    from lightning_influence.results import (
        CorrectionReport,
        DampingCheck,
        Explanation,
        LeaveOneOutCheck,
        MislabelReport,
        SolveInfo,
        STest,
        TopInfluences,
        TrustReport,
    )

__version__ = "0.1.0"

#: Where each public name lives. Nothing is imported until a name is used: ``import lightning_influence`` (e.g. by
#: the TensorBoard plugin's entry point) costs no torch or Lightning import.
_LAZY = {
    **dict.fromkeys(("CGConfig", "CorrectionConfig", "ExactConfig", "ExplainConfig", "LissaConfig", "LowRankConfig",
                     "ProblemConfig"), "lightning_influence.config"),
    **dict.fromkeys(("Solver", "register_solver"), "lightning_influence.core.solvers"),
    **dict.fromkeys(("Curvature", "register_curvature"), "lightning_influence.core.curvature"),
    **dict.fromkeys(("DampingRule", "register_damping_rule"), "lightning_influence.core.curvature.damping"),
    "register_view": "lightning_influence.reporting.views",
    **dict.fromkeys(("CorrectionReport", "DampingCheck", "Explanation", "LeaveOneOutCheck", "MislabelReport",
                     "SolveInfo", "STest",
                     "TopInfluences", "TrustReport"), "lightning_influence.results"),
    **dict.fromkeys(("influence", "s_test", "self_influence", "top_influences"), "lightning_influence.functional"),
    "LissaDivergenceError": "lightning_influence.core.solvers.neumann",
    "take_snapshot": "lightning_influence.core.trajectory",
    "verify_leave_one_out": "lightning_influence.analysis.leave_one_out",
    "check_damping_by_retraining": "lightning_influence.analysis.damping_check",
    "InfluenceCallback": "lightning_influence.callbacks.influence",
    "MislabelCallback": "lightning_influence.callbacks.mislabel",
    "TrainingSignalsCallback": "lightning_influence.callbacks.training_signals",
    "TrainingSignalRecorder": "lightning_influence.analysis.training_signals",
    "correct_errors": "lightning_influence.correct",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


__all__ = [
    "CGConfig",
    "CorrectionConfig",
    "CorrectionReport",
    "Curvature",
    "DampingCheck",
    "DampingRule",
    "ExactConfig",
    "ExplainConfig",
    "Explanation",
    "InfluenceCallback",
    "LeaveOneOutCheck",
    "LissaConfig",
    "LissaDivergenceError",
    "LowRankConfig",
    "MislabelCallback",
    "MislabelReport",
    "ProblemConfig",
    "STest",
    "SolveInfo",
    "Solver",
    "TopInfluences",
    "TrainingSignalRecorder",
    "TrainingSignalsCallback",
    "TrustReport",
    "check_damping_by_retraining",
    "correct_errors",
    "influence",
    "register_curvature",
    "register_damping_rule",
    "register_solver",
    "register_view",
    "s_test",
    "self_influence",
    "take_snapshot",
    "top_influences",
    "verify_leave_one_out",
]
