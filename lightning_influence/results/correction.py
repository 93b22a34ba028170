"""What a leave-one-out check and an error-correction run found."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class LeaveOneOutCheck:
    """Predicted vs actual test-loss change for each removed training example.

    Attributes:
        train_indices: the removed training examples (dataset indices).
        influence: their ``I(z, z_test)`` (positive = harmful).
        predicted: ``-influence / n``, the predicted change of the test loss on removal.
        actual: ``L_test(theta_-z) - L_test(theta_base)`` after the retraining.
        pearson, spearman: agreement of ``predicted`` and ``actual`` (None with fewer than 3 points).
        base_test_loss: the test loss after the baseline retraining.
        train_size: n.
        steps: retraining steps allowed per run.
        seconds: wall time of all retraining runs.
        damping: the number the influence was solved with (``damping="auto"`` resolved), None when influences
            were given.
        l2: the L2 strength of the retraining objective.
        l2_towards_zero: the part of ``l2`` that pulls towards 0 (the training's weight decay); the rest pulls
            towards the analysed weights.
        start_test_loss: the test loss at the analysed parameters, before any retraining.
        steps_run: steps each run took, the baseline first (a run stops early once its test loss has settled).
        last_step_change: how much the baseline's last step still moved the test loss (its resolution: a
            removal's change smaller than this is not measured).
        slope: least-squares ``actual ~= slope * predicted`` (through 0; 1 = the magnitudes agree).
        sign_agreement: share of the removals whose actual change has the predicted sign.
    """

    train_indices: tuple[int, ...]
    influence: torch.Tensor
    predicted: torch.Tensor
    actual: torch.Tensor
    pearson: Optional[float]
    spearman: Optional[float]
    base_test_loss: float
    train_size: int
    steps: int
    seconds: float
    damping: Optional[float] = None
    l2: float = 0.0
    l2_towards_zero: float = 0.0
    start_test_loss: Optional[float] = None
    steps_run: tuple[int, ...] = ()
    last_step_change: Optional[float] = None
    slope: Optional[float] = None
    sign_agreement: Optional[float] = None


@dataclass(frozen=True)
class Metrics:
    """Mean per-example loss and (when batches carry labels and the model outputs class scores) accuracy."""

    loss: float
    accuracy: Optional[float]
    size: int


@dataclass(frozen=True)
class CorrectionIteration:
    """One round. ``chosen_indices`` are training-set indices, or anchor indices for ``selection="anchors"``;
    ``anchor_indices`` index the anchor data (its dataset's indices when the anchors are a ``Subset``).
    ``damping`` and ``residual`` are those of the round's s_test solve (helpful/harmful selection only).
    ``anchor_weights`` (``"anchors+..."`` selections with ``project_replay``): per step, the weight of the anchors'
    mean loss, ``1 + max(0, -g_A . g_R / |g_A|^2)``, that cancels the part of the replay gradient ``g_R`` opposing
    the anchors' gradient ``g_A`` (1: no conflict). ``protect_cosines`` (with ``protect_per_step``): per step, the
    cosine between the step's gradient and the gradient of the protect sample's mean loss before the projection
    (negative: the step would have raised the protect sample's loss, and that component was removed); for
    ``"constrained"`` the smallest cosine between the step's gradient and one protect example's."""

    iteration: int
    anchor_indices: tuple[int, ...]
    chosen_indices: tuple[int, ...]
    chosen_influence: Optional[tuple[float, ...]]
    anchor_loss_before: float
    anchor_loss_after: float
    metrics: dict[str, Metrics]
    seconds: float
    damping: Optional[float] = None
    residual: Optional[float] = None
    converged: Optional[bool] = None
    anchor_weights: Optional[tuple[float, ...]] = None
    protect_cosines: Optional[tuple[float, ...]] = None


@dataclass(frozen=True)
class CorrectionReport:
    """A whole run: the metrics before, every round, and the settings that produced them.

    ``after`` is the last round's metrics (``before`` when no round ran). Influence uses the convention
    ``I(z, A) = -s . grad L(z)``: negative = helpful to the anchors, positive = harmful.
    """

    selection: str
    settings: dict[str, Any]
    before: dict[str, Metrics]
    iterations: tuple[CorrectionIteration, ...] = field(default=())

    @property
    def after(self) -> dict[str, Metrics]:
        return self.iterations[-1].metrics if self.iterations else self.before

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready (a non-finite number, e.g. the loss of a diverged run, becomes None)."""
        return _finite({"selection": self.selection, "settings": self.settings,
                        "before": {k: asdict(m) for k, m in self.before.items()},
                        "after": {k: asdict(m) for k, m in self.after.items()},
                        "iterations": [asdict(step) for step in self.iterations]})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorrectionReport:
        def metrics(values: dict[str, Any]) -> dict[str, Metrics]:
            return {k: Metrics(**m) for k, m in values.items()}

        steps = tuple(
            CorrectionIteration(**{**s, "anchor_indices": tuple(s["anchor_indices"]),
                                   "chosen_indices": tuple(s["chosen_indices"]),
                                   "chosen_influence": None if s["chosen_influence"] is None
                                   else tuple(s["chosen_influence"]), "metrics": metrics(s["metrics"]),
                                   "anchor_weights": None if s.get("anchor_weights") is None
                                   else tuple(s["anchor_weights"]),
                                   "protect_cosines": None if s.get("protect_cosines") is None
                                   else tuple(s["protect_cosines"])})
            for s in data["iterations"]
        )
        return cls(data["selection"], dict(data["settings"]), metrics(data["before"]), steps)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
