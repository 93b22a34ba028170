"""Solver configuration (validated, immutable) and result records shared by every solver."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from lightning_influence.core.defaults import CHECK_EVERY, MAX_RETRIES, RESIDUAL_TOL

SOLVERS = ("lissa", "cg", "exact", "lowrank")
SCORING_METHODS = ("auto", "factored", "jvp", "per_example_grad")


def _expect(ok: bool, name: str, allowed: str, value: Any, hint: str = "") -> None:
    if not ok:
        raise ValueError(f"Expected `{name}` to be {allowed}, but got {value!r}.{(' ' + hint) if hint else ''}")


@dataclass(frozen=True)
class LissaConfig:
    """LiSSA: ``h_j = v + h_{j-1} - (H_j + damping I) h_{j-1} / scale``, ``x = mean_r h_J^(r) / scale``.

    Attributes:
        depth: recursion steps J per repeat.
        repeats: independent repeats T averaged (repeat r is seeded by ``(seed, r)`` alone).
        batch_size: training examples B in each minibatch Hessian ``H_j``.
        scale: must exceed half the top eigenvalue of ``H_j + damping I``; ``"auto"`` estimates it by power
            iteration on minibatches of size ``batch_size``.
        seed: base seed for minibatch sampling.
        tol: stop a repeat early at the first step whose relative update ``||h_j - h_{j-1}|| / ||h_j||`` (max
            over the test points) falls below it; that step is the repeat's last trace entry (0 runs all
            ``depth`` steps).
        hvp_method: ``"double_backward"`` or ``"forward_over_reverse"`` (Hessian products only).
        residual_tol: ``converged`` means ``max ||(C + damping I) x - v|| / ||v|| <= residual_tol`` on a fixed
            training subset; a repeat also stops once its own estimate meets it.
        check_every: steps between those residual checks (0: only the final check, no early stop).
        max_retries: restarts after a divergence (``scale`` raised, or damping under ``"hessian"``) before
            :class:`LissaDivergenceError`.
    """

    depth: int = 1000
    repeats: int = 1
    batch_size: int = 128
    scale: Union[float, str] = "auto"
    seed: int = 0
    tol: float = 0.0
    hvp_method: str = "double_backward"
    residual_tol: float = RESIDUAL_TOL
    check_every: int = CHECK_EVERY
    max_retries: int = MAX_RETRIES

    def __post_init__(self) -> None:
        _expect(isinstance(self.depth, int) and self.depth >= 1, "depth", "a positive int", self.depth)
        _expect(isinstance(self.repeats, int) and self.repeats >= 1, "repeats", "a positive int", self.repeats)
        _expect(
            isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "a positive int", self.batch_size
        )
        _expect(
            self.scale == "auto" or (isinstance(self.scale, (int, float)) and self.scale > 0),
            "scale",
            "a positive number or 'auto'",
            self.scale,
        )
        _expect(isinstance(self.seed, int), "seed", "an int", self.seed)
        _expect(isinstance(self.tol, (int, float)) and self.tol >= 0, "tol", "a number >= 0", self.tol)
        _expect(
            self.hvp_method in ("double_backward", "forward_over_reverse"),
            "hvp_method",
            "'double_backward' or 'forward_over_reverse'",
            self.hvp_method,
        )
        _expect(isinstance(self.residual_tol, (int, float)) and self.residual_tol > 0, "residual_tol",
                "a positive number", self.residual_tol)
        _expect(isinstance(self.check_every, int) and self.check_every >= 0, "check_every", "an int >= 0",
                self.check_every)
        _expect(isinstance(self.max_retries, int) and self.max_retries >= 0, "max_retries", "an int >= 0",
                self.max_retries)


@dataclass(frozen=True)
class CGConfig:
    """Conjugate gradient on full-data HVPs: stops when ``||r|| / ||v|| < tol`` or after ``max_iter``."""

    max_iter: int = 200
    tol: float = 1e-6

    def __post_init__(self) -> None:
        _expect(isinstance(self.max_iter, int) and self.max_iter >= 1, "max_iter", "a positive int", self.max_iter)
        _expect(isinstance(self.tol, (int, float)) and self.tol > 0, "tol", "a positive number", self.tol)


@dataclass(frozen=True)
class ExactConfig:
    """Materialise H (P x P) and solve by eigendecomposition in float64: the reference for small models."""

    max_parameters: int = 20_000

    def __post_init__(self) -> None:
        _expect(self.max_parameters >= 1, "max_parameters", "a positive int", self.max_parameters)


@dataclass(frozen=True)
class LowRankConfig:
    """Top eigenpairs of H by Lanczos on HVPs; damping alone on the remaining directions.

    Attributes:
        rank: eigenpairs kept (largest eigenvalues).
        iterations: Lanczos steps (each one HVP pass over ``hvp_examples``); 0 means ``2 * rank``.
        hvp_examples: training examples the Lanczos HVPs average over (a fixed seeded subset; None = all).
        seed: seeds the subset and the start vector.
        residual: add ``(g - Q Q^T g) / damping`` for the directions outside the top eigenspace.
    """

    rank: int = 64
    iterations: int = 0
    hvp_examples: Optional[int] = 2048
    seed: int = 0
    residual: bool = True

    def __post_init__(self) -> None:
        _expect(isinstance(self.rank, int) and self.rank >= 1, "rank", "a positive int", self.rank)
        _expect(isinstance(self.iterations, int) and self.iterations >= 0, "iterations", "an int >= 0", self.iterations)
        _expect(
            self.hvp_examples is None or (isinstance(self.hvp_examples, int) and self.hvp_examples >= 1),
            "hvp_examples",
            "a positive int or None",
            self.hvp_examples,
        )

    @property
    def steps(self) -> int:
        return self.iterations or 2 * self.rank


SolverConfig = Union[LissaConfig, CGConfig, ExactConfig, LowRankConfig]
_CONFIGS = {"lissa": LissaConfig, "cg": CGConfig, "exact": ExactConfig, "lowrank": LowRankConfig}


def make_solver_config(solver: str, options: dict[str, Any]) -> SolverConfig:
    """Build the config for ``solver`` from keyword options, rejecting options it does not take."""
    _expect(solver in SOLVERS, "solver", f"one of {SOLVERS}", solver)
    cls = _CONFIGS[solver]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"Unexpected option(s) {unknown} for solver={solver!r}. It takes: {sorted(allowed)} (and `damping`)."
        )
    return cls(**options)


def check_damping(damping: float | str) -> float | str:
    if damping == "auto":
        return "auto"
    _expect(
        isinstance(damping, (int, float)) and damping >= 0,
        "damping",
        "'auto' or a number >= 0 (the lambda added to the curvature)",
        damping,
    )
    return float(damping)


@dataclass(frozen=True)
class SolveInfo:
    """How an inverse-HVP solve went. ``trace`` rows are repeats (LiSSA) or one row of CG residuals.

    ``curvature`` names C in ``(C + damping I) x = v``; ``damping_requested``/``damping_rule`` say how ``damping``
    was chosen; ``eigenvalue_min``/``eigenvalue_max`` are C's extreme eigenvalues (exact, or Lanczos estimates);
    ``residual`` is ``max ||(C + damping I) x - v|| / ||v||`` on the check subset and ``converged`` means it is at
    most ``residual_tol`` (when a residual was measured); ``retries`` records each LiSSA restart and
    ``warnings`` what the user should know (e.g. damping raised above the Hessian's negative curvature).
    """

    solver: str
    damping: float
    seconds: float
    converged: bool
    scale: float | None = None
    trace: torch.Tensor | None = field(default=None, repr=False)
    eigenvalue_min: float | None = None
    eigenvalue_max: float | None = None
    iterations: int = 0
    curvature: str | None = None
    damping_requested: float | str | None = None
    damping_rule: str | None = None
    residual: float | None = None
    residual_tol: float | None = None
    retries: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class STest:
    """``s_test = (H + damping I)^-1 grad L(z_test)``, one flat row per test point, and how it was solved."""

    vectors: torch.Tensor
    info: SolveInfo
