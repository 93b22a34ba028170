"""Pure-PyTorch influence engine: no Lightning, no torch.distributed, no I/O."""

from lightning_influence.core.api import DEFAULT_DAMPING, influence, s_test, self_influence, top_influences
from lightning_influence.core.config import CGConfig, ExactConfig, LissaConfig, SolveInfo, STest
from lightning_influence.core.curvature import OutputCaptureError, SplitLoss
from lightning_influence.core.lissa import LissaDivergenceError
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import StreamingTopK, TopInfluences

__all__ = [
    "DEFAULT_DAMPING",
    "CGConfig",
    "ExactConfig",
    "InfluenceProblem",
    "LissaConfig",
    "LissaDivergenceError",
    "OutputCaptureError",
    "STest",
    "SolveInfo",
    "SplitLoss",
    "StreamingTopK",
    "TopInfluences",
    "influence",
    "s_test",
    "self_influence",
    "top_influences",
]
