"""What a solve or an influence analysis found: solve records, top influences, explanations, mislabel
candidates and the trust report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch


@dataclass(frozen=True)
class Influencer:
    """One training example's influence on a monitored validation point.

    ``influence`` follows the package convention: positive = harmful, negative = helpful.
    ``input`` is the example's input tensor when it is an image or small (see ``core.batching.keeps_input``), else None.
    """

    train_index: int
    influence: float
    label: Any = None
    prediction: Any = None
    loss: Optional[float] = None
    input: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    text: Optional[str] = None  # the example as the user's ``example_formatter`` renders it (e.g. decoded tokens)


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
    text: Optional[str] = None


@dataclass(frozen=True)
class SolveInfo:
    """How an inverse-HVP solve went: the settings used and the convergence ``trace``.

    ``trace`` rows are LiSSA repeats (relative update per step) or one row of CG residuals (also for a LiSSA solve
    routed to CG, ``settings["solved_by"] == "cg"``: see :func:`trace_name`). ``curvature`` names C in
    ``(C + damping I) x = v``; ``damping_requested``/``damping_rule`` say how ``damping`` was chosen;
    ``eigenvalue_min``/``eigenvalue_max`` are C's extreme eigenvalues (exact, or Lanczos estimates); ``residual``
    is ``max ||(C + damping I) x - v|| / ||v||`` over the whole training set, and for LiSSA ``converged`` means it is at
    most ``residual_tol``; ``retries`` records each LiSSA restart and ``warnings`` what the user should know
    (e.g. damping raised above the Hessian's negative curvature); ``damping_check`` the table behind
    ``damping="self_check"``.
    """

    solver: str
    damping: float
    converged: bool
    seconds: float
    scale: Optional[float] = None
    settings: dict[str, Any] = field(default_factory=dict)
    trace: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    eigenvalue_min: Optional[float] = None
    eigenvalue_max: Optional[float] = None
    iterations: int = 0
    curvature: Optional[str] = None
    damping_requested: Optional[Union[float, str]] = None
    damping_rule: Optional[str] = None
    residual: Optional[float] = None
    residual_tol: Optional[float] = None
    retries: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()
    damping_check: Optional["DampingCheck"] = None


def trace_name(solver: str, settings: Optional[dict[str, Any]]) -> str:
    """Which solver's steps a solve's ``trace`` holds (its TensorBoard tags say it): the route a LiSSA solve took
    when it went to conjugate gradient from the start, else the solver."""
    return str((settings or {}).get("solved_by") or solver)


#: The name reports used for :class:`SolveInfo` before the two records were merged.
SolverSummary = SolveInfo


@dataclass(frozen=True)
class STest:
    """``s_test = (H + damping I)^-1 grad L(z_test)``, one flat row per test point, and how it was solved.

    ``halves``: for a solver of independent repeats (LiSSA with at least 2), the means of its even- and its
    odd-numbered repeats, which the trust report compares; None otherwise.
    """

    vectors: torch.Tensor
    info: SolveInfo
    halves: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TopInfluences:
    """Top-m harmful (largest positive) and helpful (most negative) training examples per test point.

    Rows are test points; ``*_indices`` hold training indices, ``*_scores`` their influence, sorted from
    the strongest. Fewer than m columns when the training set is smaller.
    """

    harmful_indices: torch.Tensor
    harmful_scores: torch.Tensor
    helpful_indices: torch.Tensor
    helpful_scores: torch.Tensor


@dataclass(frozen=True)
class InfluenceReport:
    """Everything one analysis (at one epoch / global step) found."""

    epoch: int
    global_step: int
    stage: str
    train_size: int
    points: tuple[ExplainedPoint, ...]
    solver: SolveInfo
    timings: dict[str, float] = field(default_factory=dict)
    trust: Optional["TrustReport"] = None


@dataclass(frozen=True)
class MislabelCandidate:
    """A training example ranked by self-influence ``I(z, z) = -g^T (H + damping I)^-1 g`` (always <= 0 when
    ``H + damping I`` is positive definite; a large ``|I(z, z)|`` means the model had to bend to fit it).

    ``loss_rank`` is the example's rank by training loss (0 = highest loss), the plain baseline shown beside it.
    With training signals recorded (``MislabelReport.signals``), ``score`` is the candidate's value of the
    report's ``ranking`` (larger = more suspicious) and ``suggested_label`` the most likely class other than
    the given one over the recorded checkpoints; both are None without them. ``flagged`` says whether the
    candidate is among the ``round(estimate)`` first of the ranking, with ``estimate`` the report's estimated
    number of wrong labels (``MislabelReport.flip_count``); None without training signals. ``input`` is the
    example's input for the first ``MISLABEL_SHOWN`` candidates and a small thumbnail of it (an image at most
    ``THUMBNAIL_SIDE`` pixels a side, uint8) for the others; None when inputs are not kept.
    """

    train_index: int
    self_influence: float
    loss: float
    loss_rank: int
    label: Any = None
    prediction: Any = None
    input: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    text: Optional[str] = None
    score: Optional[float] = None
    suggested_label: Any = None
    flagged: Optional[bool] = None


@dataclass(frozen=True)
class MislabelReport:
    """The top training examples by the report's ``ranking`` at one analysis, and how they were computed.

    ``ranking`` names the ranking that orders ``candidates``: ``"self_influence"`` (largest ``|I(z, z)|``
    first) without training signals, else the signals' default (``"el2n_separated"``). ``rankings`` holds every
    named score as ``Tensor[train_size]``, larger = more suspicious (``"self_influence"`` is ``-I(z, z)``).
    ``signals`` describes the training signals used (``{"epochs", "seconds", "default"}``), None when the
    analysis had none (post hoc, from a checkpoint only). ``flip_count`` is the estimated number of wrong
    training labels from the signals: ``{"method", "estimate", "low", "high", "level", "flagged",
    "threshold", "fraction", "plausible_low", "plausible_high"}`` (``docs/mislabel.md``), None without
    training signals.
    """

    epoch: int
    global_step: int
    train_size: int
    candidates: tuple[MislabelCandidate, ...]
    solver: SolveInfo
    seconds: float
    scores: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    ranking: str = "self_influence"
    rankings: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    signals: Optional[dict[str, Any]] = None
    flip_count: Optional[dict[str, Any]] = None


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

    ``residual_examples`` is the number of training examples in the curvature of the residual check (the
    whole training set); ``gradient_ratio`` is ``||grad R + weight_decay theta|| /
    rms_i ||grad L(z_i)||`` on a fixed subset (near 0 at a minimum, near 1 early in training);
    ``top_eigenvalue`` estimates the largest eigenvalue of the recursion's minibatch ``H_j + damping I``.
    """

    points: tuple[PointTrust, ...]
    warnings: tuple[TrustWarning, ...]
    residual_examples: int = 0
    gradient_ratio: Optional[float] = None
    gradient_examples: int = 0
    top_eigenvalue: Optional[float] = None


@dataclass(frozen=True)
class DampingCheck:
    """How ``damping="self_check"`` chose the damping: the mean LDS of each candidate against short retrainings.

    Attributes:
        chosen: the damping used.
        candidates: the dampings tried.
        lds: mean linear datamodeling score of each candidate (NaN where its solve did not converge).
        points: validation points the score averages over.
        retrainings: warm-started retrainings on random halves of the training set.
        epochs: epochs of each retraining.
        seconds: wall time of the whole check; ``retraining_seconds`` of the retrainings alone.
        epoch: the training epoch of the analysis that ran it (None outside a callback).
    """

    chosen: float
    candidates: tuple[float, ...]
    lds: tuple[float, ...]
    points: int
    retrainings: int
    epochs: int
    seconds: float
    retraining_seconds: float = 0.0
    epoch: Optional[int] = None

    @property
    def rule(self) -> str:
        """The choice in words (the solve record's ``damping_rule``)."""
        table = ", ".join(f"{d:g}: {'n/c' if v != v else f'{v:.3f}'}" for d, v in zip(self.candidates, self.lds))
        at = "" if self.epoch is None else f" at epoch {self.epoch}"
        return (f"self_check{at}: best mean LDS over {self.points} validation points against {self.retrainings}"
                f" retrainings on random halves ({self.epochs} epoch(s) each, warm-started) among [{table}]")


@dataclass(frozen=True)
class ScoreShard:
    """This rank's full scores: ``scores[:, j]`` is the influence of training example ``train_indices[j]``.

    Only kept when full scores are asked for; never gathered (each rank writes its own shard file).
    """

    train_indices: torch.Tensor
    scores: torch.Tensor
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class Explanation:
    """What :func:`~lightning_influence.analysis.explain.explain` found; every rank gets the same one except
    ``score_shard`` (only rank 0 writes the rest)."""

    points: tuple[ExplainedPoint, ...]
    solver: SolveInfo
    timings: dict[str, float]
    train_size: int
    score_shard: Optional[ScoreShard] = None
    trust: Optional[TrustReport] = None

    @property
    def full_scores(self) -> Optional[torch.Tensor]:
        """``[n_points, n_train]`` scores in training-index order (NaN where not scored, e.g. outside the
        candidates); only in a single process (else ``None``: each rank holds its own shard)."""
        shard_ = self.score_shard
        if shard_ is None or shard_.world_size != 1:
            return None
        table = shard_.scores.new_full((shard_.scores.shape[0], self.train_size), float("nan"))
        table[:, shard_.train_indices] = shard_.scores
        return table
