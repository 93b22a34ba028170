"""Pure single-process math: no Lightning, no torch.distributed, no I/O.

Parameters, per-example losses and gradients, curvature-vector products, the inverse-HVP solvers (exact, CG,
LiSSA, low-rank), scoring and the nearest-neighbour candidates. Everything above builds on these.
"""

from lightning_influence.core.curvature import OutputCaptureError, SplitLoss
from lightning_influence.core.lissa import LissaDivergenceError
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import StreamingTopK

__all__ = ["InfluenceProblem", "LissaDivergenceError", "OutputCaptureError", "SplitLoss", "StreamingTopK"]
