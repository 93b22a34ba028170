"""Result records: what an analysis found, as small immutable values handed to the writers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class Influencer:
    """One training example's influence on a monitored validation point.

    ``influence`` follows the package convention: positive = harmful, negative = helpful.
    ``input`` is the example's input tensor when the data looks like images (for grids), else None.
    """

    train_index: int
    influence: float
    label: Any = None
    prediction: Any = None
    loss: Optional[float] = None
    input: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ExplainedPoint:
    """A monitored validation example with its top harmful and helpful training examples.

    ``scores`` holds the influence of every scored training example on this point (or a sample of at most
    ``MAX_HISTOGRAM_SCORES``) for histograms; ``harmful``/``helpful`` are sorted strongest first.
    """

    val_index: int
    label: Any
    prediction: Any
    loss: float
    harmful: tuple[Influencer, ...]
    helpful: tuple[Influencer, ...]
    scores: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    input: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SolverSummary:
    """How s_test was solved: the settings used and the convergence trace ``[repeats, steps]``."""

    solver: str
    damping: float
    converged: bool
    seconds: float
    scale: Optional[float] = None
    settings: dict[str, Any] = field(default_factory=dict)
    trace: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class InfluenceReport:
    """Everything one analysis (at one epoch / global step) found."""

    epoch: int
    global_step: int
    stage: str
    train_size: int
    points: tuple[ExplainedPoint, ...]
    solver: SolverSummary
    timings: dict[str, float] = field(default_factory=dict)
    trust: Optional["TrustReport"] = None


@dataclass(frozen=True)
class MislabelCandidate:
    """A training example ranked by self-influence ``I(z, z) = -g^T (H + damping I)^-1 g`` (always <= 0 when
    ``H + damping I`` is positive definite; a large ``|I(z, z)|`` means the model had to bend to fit it).

    ``loss_rank`` is the example's rank by training loss (0 = highest loss), the plain baseline shown beside it.
    """

    train_index: int
    self_influence: float
    loss: float
    loss_rank: int
    label: Any = None
    prediction: Any = None
    input: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class MislabelReport:
    """The top training examples by ``|I(z, z)|`` at one analysis, and how they were computed."""

    epoch: int
    global_step: int
    train_size: int
    candidates: tuple[MislabelCandidate, ...]
    solver: SolverSummary
    seconds: float
    scores: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TrustWarning:
    """A reason to trust an analysis less, with what to do about it.

    ``code`` is a stable identifier (e.g. ``"no_damping"``); ``severity`` is ``"warning"`` or ``"info"``
    (a condition the package already handles, stated so the user knows).
    """

    code: str
    message: str
    severity: str = "warning"


@dataclass(frozen=True)
class PointTrust:
    """Self-diagnosis of one monitored point's s_test.

    ``residual`` is ``||(H + damping I) x - v|| / ||v||`` for the solved ``x = s_test`` and ``v = grad L(z_val)``;
    ``repeat_pearson``/``repeat_spearman`` correlate the top-k training scores computed from two disjoint
    halves of the LiSSA repeats (None for deterministic solvers or fewer than 2 repeats).
    """

    val_index: int
    residual: Optional[float]
    repeat_pearson: Optional[float] = None
    repeat_spearman: Optional[float] = None


@dataclass(frozen=True)
class TrustReport:
    """How far to trust an analysis: per-point diagnostics, model-level measurements and warnings.

    ``residual_examples`` is the number of training examples in the Hessian of the residual check (the
    full training set when it is small enough); ``gradient_ratio`` is ``||grad R + weight_decay theta|| /
    rms_i ||grad L(z_i)||`` on a fixed subset (near 0 at a minimum, near 1 early in training);
    ``top_eigenvalue`` estimates the largest eigenvalue of the recursion's minibatch ``H_j + damping I``.
    """

    points: tuple[PointTrust, ...]
    warnings: tuple[TrustWarning, ...]
    residual_examples: int = 0
    gradient_ratio: Optional[float] = None
    gradient_examples: int = 0
    top_eigenvalue: Optional[float] = None
