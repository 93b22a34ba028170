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

__all__ = [
    "CGConfig",
    "ExactConfig",
    "LissaConfig",
    "LissaDivergenceError",
    "STest",
    "SolveInfo",
    "TopInfluences",
    "influence",
    "s_test",
    "self_influence",
    "top_influences",
]
