"""Pure single-process math: no Lightning, no torch.distributed, no I/O.

Parameters, per-example losses and gradients, curvature-vector products, the inverse-HVP solvers (exact, CG,
LiSSA, low-rank), scoring and the nearest-neighbour candidates. Everything above builds on these.
"""

from lightning_influence.core.curvature.products import OutputCaptureError, SplitLoss
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import StreamingTopK
from lightning_influence.core.solvers.neumann import LissaDivergenceError

__all__ = ["InfluenceProblem", "LissaDivergenceError", "OutputCaptureError", "SplitLoss", "StreamingTopK"]
