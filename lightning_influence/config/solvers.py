"""Solver configs (one frozen dataclass per solver, validated on construction) and the registry of solver names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning_influence.config.defaults import (
    CG_TOL,
    CHECK_EVERY,
    CURVATURE_EXAMPLES,
    MAX_RETRIES,
    RESIDUAL_TOL,
    expect,
)


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
        average: also consider the mean of the iterates since the last power-of-two step (Polyak-Ruppert tail
            averaging; the recursion's minibatch noise averages out) and keep whichever of it and the last
            iterate has the smaller residual.
        preconditioner: None (plain LiSSA), ``"kfac"`` or ``"ekfac"``: the recursion runs on
            ``P^-1/2 (H_j + damping I) P^-1/2`` with ``P`` the Kronecker-factored approximation of the
            Gauss-Newton curvature plus damping, so its steps to converge follow the condition number of that
            product rather than of ``H + damping I``: what makes small dampings affordable. Applies to
            positive semi-definite curvatures only (the Hessian's recursion stays plain).
        refine: when the averaged repeats miss ``residual_tol`` (small dampings: the recursion's steps grow with
            the condition number), finish with conjugate gradient on the remaining residual
            ``v - (C + damping I) x`` over the whole training set (the points split over ranks), at most
            ``REFINE_MAX_ITER`` steps; the record names the steps it took. False: report the miss as it is.
        route: ``"auto"``: before the recursion starts, compare its predicted work with conjugate gradient's
            (``core.solvers.neumann.recursion_costs_more``: the series' steps, rounded up to its next early-stop check
            and with the checks' reads counted, grow with ``scale / damping``, CG's
            passes over the training set with the square root of the condition number) and, with ``refine`` on a
            positive semi-definite curvature, solve by CG from the start where CG is predicted cheaper (small
            training sets at small dampings); the record says so (``settings["solved_by"] == "cg"``).
            ``"recursion"``: always run the recursion.
        shrink_batch: where the recursion runs (not routed to CG) with ``scale="auto"``, no preconditioner and a
            training set larger than the check subset, step with the minibatch size of least predicted work
            among ``batch_size`` and the ``LISSA_STEP_BATCHES`` below it: a step costs about ``b`` examples'
            products, and the steps needed follow ``scale_b / damping`` with ``scale_b`` probed on minibatches
            of ``b`` examples (``series_steps(scale_b) x b``); the record names the size used
            (``settings["step_batch_size"]``) and the probed scales. False (the default): always ``batch_size``. Off
            by default: on the 1.0M-parameter CNN of ``benchmarks/scale.py`` its steps cost a ninth of the
            128-example ones, but its solve was not shown to converge within the predicted steps
            (``benchmarks/scale-lissa-results.json``).
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
    average: bool = True
    preconditioner: Optional[str] = None
    refine: bool = True
    route: str = "auto"
    shrink_batch: bool = False

    def __post_init__(self) -> None:
        expect(isinstance(self.depth, int) and self.depth >= 1, "depth", "a positive int", self.depth)
        expect(isinstance(self.repeats, int) and self.repeats >= 1, "repeats", "a positive int", self.repeats)
        expect(
            isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "a positive int", self.batch_size
        )
        expect(
            self.scale == "auto" or (isinstance(self.scale, (int, float)) and self.scale > 0),
            "scale",
            "a positive number or 'auto'",
            self.scale,
        )
        expect(isinstance(self.seed, int), "seed", "an int", self.seed)
        expect(isinstance(self.tol, (int, float)) and self.tol >= 0, "tol", "a number >= 0", self.tol)
        expect(
            self.hvp_method in ("double_backward", "forward_over_reverse"),
            "hvp_method",
            "'double_backward' or 'forward_over_reverse'",
            self.hvp_method,
        )
        expect(isinstance(self.residual_tol, (int, float)) and self.residual_tol > 0, "residual_tol",
               "a positive number", self.residual_tol)
        expect(isinstance(self.check_every, int) and self.check_every >= 0, "check_every", "an int >= 0",
               self.check_every)
        expect(isinstance(self.max_retries, int) and self.max_retries >= 0, "max_retries", "an int >= 0",
               self.max_retries)
        expect(self.preconditioner is None or self.preconditioner in PRECONDITIONERS, "preconditioner",
               f"None or one of {PRECONDITIONERS}", self.preconditioner)
        expect(isinstance(self.refine, bool), "refine", "True or False", self.refine)
        expect(self.route in LISSA_ROUTES, "route", f"one of {LISSA_ROUTES}", self.route)
        expect(isinstance(self.shrink_batch, bool), "shrink_batch", "True or False", self.shrink_batch)


#: ``LissaConfig.route``: predict the cheaper of the recursion and conjugate gradient, or always the recursion.
LISSA_ROUTES = ("auto", "recursion")
#: Preconditioners of conjugate gradient (``CGConfig.preconditioner``): Kronecker-factored approximations of the
#: Gauss-Newton curvature of Linear/Conv2d layers (see ``docs/solvers.md``).
PRECONDITIONERS = ("kfac", "ekfac")


@dataclass(frozen=True)
class CGConfig:
    """(Preconditioned) conjugate gradient on full-data curvature products.

    Attributes:
        max_iter: at most this many steps (one full-data product each).
        tol: stop once every row's relative residual ``||(C + damping I) x - v|| / ||v||`` (the recurrence's)
            is below it; ``SolveInfo.iterations`` is the steps taken.
        preconditioner: None (plain CG), ``"kfac"`` or ``"ekfac"`` (eigenvalue-corrected K-FAC): built once
            from a pass over the check subset and cached while the weights do not change.
    """

    max_iter: int = 200
    tol: float = CG_TOL
    preconditioner: Optional[str] = None

    def __post_init__(self) -> None:
        expect(isinstance(self.max_iter, int) and self.max_iter >= 1, "max_iter", "a positive int", self.max_iter)
        expect(isinstance(self.tol, (int, float)) and self.tol > 0, "tol", "a positive number", self.tol)
        expect(self.preconditioner is None or self.preconditioner in PRECONDITIONERS, "preconditioner",
               f"None or one of {PRECONDITIONERS}", self.preconditioner)


@dataclass(frozen=True)
class ExactConfig:
    """Materialise H (P x P) and solve by eigendecomposition in float64: the reference for small models."""

    max_parameters: int = 20_000

    def __post_init__(self) -> None:
        expect(self.max_parameters >= 1, "max_parameters", "a positive int", self.max_parameters)


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
    hvp_examples: Optional[int] = CURVATURE_EXAMPLES
    seed: int = 0
    residual: bool = True

    def __post_init__(self) -> None:
        expect(isinstance(self.rank, int) and self.rank >= 1, "rank", "a positive int", self.rank)
        expect(isinstance(self.iterations, int) and self.iterations >= 0, "iterations", "an int >= 0", self.iterations)
        expect(
            self.hvp_examples is None or (isinstance(self.hvp_examples, int) and self.hvp_examples >= 1),
            "hvp_examples",
            "a positive int or None",
            self.hvp_examples,
        )

    @property
    def steps(self) -> int:
        return self.iterations or 2 * self.rank


SolverConfig = Union[LissaConfig, CGConfig, ExactConfig, LowRankConfig]
#: A damping: a number, or ``"auto"``.
Damping = Union[float, str]
#: Config class of each solver name: the built-in four, plus any added by ``core.solvers.register_solver``.
_CONFIGS: dict[str, type] = {"lissa": LissaConfig, "cg": CGConfig, "exact": ExactConfig, "lowrank": LowRankConfig}
def register_solver_config(name: str, config_type: type) -> None:
    """Make ``solver=name`` build a ``config_type`` (see :func:`lightning_influence.core.solvers.register_solver`)."""
    expect(isinstance(name, str) and name.isidentifier(), "name", "a solver name (an identifier)", name)
    expect(dataclasses.is_dataclass(config_type) and isinstance(config_type, type), "config_type",
           "a dataclass type (frozen, validated in __post_init__)", config_type)
    known = _CONFIGS.get(name)
    if known is not None and _same_definition(known, config_type):
        known = None  # the same class defined again (a module or a notebook cell run twice): the newer one counts
    if known is not None and known is not config_type:
        raise ValueError(f"Expected a new solver name, but {name!r} is already registered to {known.__name__}.")
    _CONFIGS[name] = config_type


def _same_definition(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def solver_names() -> tuple[str, ...]:
    """Every registered solver name."""
    return tuple(_CONFIGS)


def make_solver_config(solver: str, options: dict[str, Any]) -> SolverConfig:
    """Build the config for ``solver`` from keyword options, rejecting options it does not take."""
    expect(solver in _CONFIGS, "solver", f"one of {solver_names()}", solver)
    cls = _CONFIGS[solver]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"Unexpected option(s) {unknown} for solver={solver!r}. It takes: {sorted(allowed)} (and `damping`)."
        )
    return cls(**options)  # type: ignore[no-any-return]



def solver_config(solver: Union[str, SolverConfig], options: Optional[dict[str, Any]] = None) -> SolverConfig:
    """A solver given as a config object (used as is) or as a name plus keyword options."""
    if isinstance(solver, tuple(_CONFIGS.values())):
        if options:
            raise TypeError(f"Got solver options {sorted(options)} beside a solver config object {solver!r}: set them"
                            f" on the config, e.g. {type(solver).__name__}({', '.join(f'{k}=...' for k in options)}).")
        return solver  # type: ignore[return-value]
    expect(isinstance(solver, str), "solver", f"one of {solver_names()} or a solver config (LissaConfig(...), ...)",
           solver)
    return make_solver_config(str(solver), dict(options or {}))


def solver_name(config: SolverConfig) -> str:
    """The name (``"lissa"``, ``"cg"``, ...) of a solver config."""
    return next(name for name, cls in _CONFIGS.items() if type(config) is cls)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config's fields as a plain dict (for reports)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
