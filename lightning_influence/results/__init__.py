"""Result records: what a solve, an analysis or a correction run found, as small immutable values.

Below everything but the configs: the core, the analysis, the writers and the shells all name these types,
and this package imports nothing of the package but :mod:`lightning_influence.config`.
"""

from lightning_influence.results.analysis import (
    DampingCheck,
    ExplainedPoint,
    Explanation,
    Influencer,
    InfluenceReport,
    MislabelCandidate,
    MislabelReport,
    PointTrust,
    ScoreShard,
    SolveInfo,
    SolverSummary,
    STest,
    TopInfluences,
    TrustReport,
    TrustWarning,
)
from lightning_influence.results.correction import (
    CorrectionIteration,
    CorrectionReport,
    LeaveOneOutCheck,
    Metrics,
)

__all__ = [
    "CorrectionIteration",
    "CorrectionReport",
    "DampingCheck",
    "ExplainedPoint",
    "Explanation",
    "InfluenceReport",
    "Influencer",
    "LeaveOneOutCheck",
    "Metrics",
    "MislabelCandidate",
    "MislabelReport",
    "PointTrust",
    "STest",
    "ScoreShard",
    "SolveInfo",
    "SolverSummary",
    "TopInfluences",
    "TrustReport",
    "TrustWarning",
]
