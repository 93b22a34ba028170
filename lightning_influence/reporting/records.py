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
