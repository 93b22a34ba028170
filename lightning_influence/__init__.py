"""lightning-influence: influence functions (Koh & Liang 2017) inside PyTorch Lightning training."""

from lightning_influence.core import (
    CGConfig,
    ExactConfig,
    LissaConfig,
    LissaDivergenceError,
    SolveInfo,
    STest,
    TopInfluences,
    influence,
    s_test,
    self_influence,
    top_influences,
)

__version__ = "0.1.0"


def __getattr__(name: str):  # the callback imports Lightning (seconds): load it only when asked for
    if name == "verify_leave_one_out":
        from lightning_influence.loo import verify_leave_one_out

        return verify_leave_one_out
    if name == "InfluenceCallback":
        from lightning_influence.callbacks.influence import InfluenceCallback

        return InfluenceCallback
    if name == "correct_errors":
        from lightning_influence.correct import correct_errors

        return correct_errors
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")

__all__ = [
    "CGConfig",
    "ExactConfig",
    "InfluenceCallback",
    "LissaConfig",
    "LissaDivergenceError",
    "STest",
    "SolveInfo",
    "TopInfluences",
    "correct_errors",
    "influence",
    "s_test",
    "self_influence",
    "top_influences",
    "verify_leave_one_out",
]
