"""Every knob of the package, torch-free: solver configs, the analysis and correction configs, and each default.

Each default is defined once here and every entry point (the callback, the functional API, ``correct_errors``,
the command line) reads it from here. Configs validate themselves in ``__post_init__``, so a config that
exists is a valid one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

SOLVERS = ("lissa", "cg", "exact", "lowrank")
SCORING_METHODS = ("auto", "hooks", "factored", "jvp", "per_example_grad")
#: Curvature used when none is given: the generalised Gauss-Newton matrix (positive semi-definite).
DEFAULT_CURVATURE = "gauss_newton"
CURVATURES = ("gauss_newton", "hessian")
#: ``damping="auto"`` (the default) is ``AUTO_DAMPING_FRACTION`` times the curvature's top eigenvalue, floored at
#: the optimizer's weight decay and never above ``MAX_DAMPING_FRACTION`` times the top eigenvalue. Measured in
#: ``benchmarks/curvature.py`` (``benchmarks/curvature-results.json``), explained in ``docs/curvature.md``.
DEFAULT_DAMPING = "auto"
AUTO_DAMPING_FRACTION = 0.03
MAX_DAMPING_FRACTION = 0.1
#: Training examples (a fixed seeded subset) that the spectrum estimate and the residual check average over.
SUBSET_EXAMPLES = 2048
SUBSET_SEED = 0
#: Lanczos steps for the extreme eigenvalues of the Hessian (the damping rule and the negative-curvature check).
SPECTRUM_STEPS = 30
#: Lanczos steps for the Gauss-Newton curvature, where ``damping="auto"`` needs only the top eigenvalue: it is
#: separated from the bulk and agreed to 4 digits after 8 steps on every model of ``benchmarks/models.py``.
TOP_EIGENVALUE_STEPS = 10
#: With ``curvature="hessian"``, damping below ``|lambda_min|`` is raised to this multiple of ``|lambda_min|``.
NEGATIVE_CURVATURE_MARGIN = 1.25
#: ``converged`` means ``max_rows ||(C + damping I) x - v|| / ||v|| <= RESIDUAL_TOL`` on the subset above.
RESIDUAL_TOL = 0.05
#: LiSSA checks that residual every ``CHECK_EVERY`` steps of a repeat and stops the repeat once it is met (a check
#: costs one curvature product per check-subset batch, about a tenth of the steps between checks on digits).
CHECK_EVERY = 50
#: LiSSA restarts after a divergence (raising ``scale``, or damping under ``"hessian"``) before it raises.
MAX_RETRIES = 3
DEFAULT_SOLVER = "lissa"
#: Conjugate gradient stops at this relative residual (a fifth of ``RESIDUAL_TOL``): measured in
#: ``benchmarks/s_test.py`` (``benchmarks/s_test-results.json``, ``docs/solvers.md``): scores with Pearson >= 0.9998
#: against the reference solve for every test point of every task there, in 10-12 steps.
CG_TOL = 0.01
DEFAULT_SCORING = "auto"
#: Training examples scored at once (bounds memory).
DEFAULT_CHUNK_SIZE = 256
#: Mislabel analysis: epochs of the training run at which the callback records per-example training signals
#: (geometrically spaced over ``max_epochs``, dense early: ``analysis.training_signals.checkpoint_epochs``);
#: their cost is measured in ``benchmarks/mislabel.py`` and ``benchmarks/mislabel_callback_cost.py``.
DEFAULT_SIGNAL_CHECKPOINTS = 10
#: Mislabel candidates shown with their inputs (TensorBoard grid and table, the JSON ``examples``); the JSON
#: lists every candidate (``mislabel_candidates="all"``: the whole training set).
MISLABEL_SHOWN = 64
#: Mean AUROC range (lowest, highest over the memorising nets' noise settings) of the final-weights
#: self-influence and of the training-signal default ranking in ``benchmarks/mislabel-results-v1.json``;
#: ``tests/unit/analysis/test_mislabel_report.py`` recomputes them from that file.
POSTHOC_MISLABEL_AUROC = {"self_influence": (0.907, 0.951), "training_signals": (0.984, 0.996)}
NO_SIGNALS_NOTE = (
    "No training signals (only the final weights): ranked by self-influence, which found fewer flipped labels"
    " than the training-signal ranking on the memorising nets of benchmarks/mislabel.py (AUROC {si[0]}-{si[1]}"
    " against {ts[0]}-{ts[1]}). Record them during training with InfluenceCallback(mislabel_candidates=...)."
).format(si=POSTHOC_MISLABEL_AUROC["self_influence"], ts=POSTHOC_MISLABEL_AUROC["training_signals"])
#: Nearest-neighbour search backends for candidate preselection, and the named built-in feature choices.
KNN_BACKENDS = ("torch", "faiss")
DEFAULT_KNN_BACKEND = "torch"
LAST_LAYER_GRAD = "last_layer_grad"
ACTIVATIONS = "activations"
FEATURE_NAMES = (LAST_LAYER_GRAD, ACTIVATIONS)
#: When candidates are preselected: ``"auto"`` only where a timed probe says it saves time (else every training
#: example is scored, with a note), ``"always"`` whenever ``num_candidates`` is set.
PRESELECT_POLICIES = ("auto", "always")
DEFAULT_PRESELECT = "auto"
#: The ``preselect="auto"`` probe times features + kNN against scoring on the first training batch, at most this
#: many examples (per-example costs fall with the batch size, so the probe uses the batches of the real run).
PRESELECT_PROBE_EXAMPLES = 256
#: Below this many probe batches in the training set ``preselect="auto"`` scores every example without probing.
PRESELECT_MIN_BATCHES = 3
#: Fine-tuning choices of :func:`~lightning_influence.correct_errors`.
SELECTIONS = ("helpful", "random", "anchors", "harmful")


def expect(ok: bool, name: str, allowed: str, value: Any, hint: str = "") -> None:
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
        average: also consider the mean of the iterates since the last power-of-two step (Polyak-Ruppert tail
            averaging; the recursion's minibatch noise averages out) and keep whichever of it and the last
            iterate has the smaller residual.
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
    hvp_examples: Optional[int] = 2048
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
_CONFIGS = {"lissa": LissaConfig, "cg": CGConfig, "exact": ExactConfig, "lowrank": LowRankConfig}


def make_solver_config(solver: str, options: dict[str, Any]) -> SolverConfig:
    """Build the config for ``solver`` from keyword options, rejecting options it does not take."""
    expect(solver in SOLVERS, "solver", f"one of {SOLVERS}", solver)
    cls = _CONFIGS[solver]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"Unexpected option(s) {unknown} for solver={solver!r}. It takes: {sorted(allowed)} (and `damping`)."
        )
    return cls(**options)


def check_damping(damping: Union[float, str]) -> Union[float, str]:
    """``"auto"`` or a number >= 0 (used as given)."""
    if damping == "auto":
        return "auto"
    expect(
        isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping >= 0,
        "damping",
        "'auto' or a number >= 0 (the lambda added to the curvature)",
        damping,
    )
    return float(damping)


def check_curvature(curvature: str) -> str:
    expect(curvature in CURVATURES, "curvature", f"one of {CURVATURES}", curvature,
           "'gauss_newton' (the default) is positive semi-definite; 'hessian' is the true second derivative"
           " (indefinite before convergence).")
    return curvature


def check_num_candidates(num_candidates: Optional[int], n_train: Optional[int] = None) -> Optional[int]:
    """``num_candidates`` (FastIF's kNN width) must be None or a positive int, at most ``n_train`` when known."""
    ok = num_candidates is None or (isinstance(num_candidates, int) and not isinstance(num_candidates, bool)
                                    and num_candidates >= 1)
    expect(ok, "num_candidates", "None or a positive int (training examples scored per point)", num_candidates)
    if n_train is not None and num_candidates is not None:
        expect(num_candidates <= n_train, "num_candidates",
               f"at most the training-set size {n_train} (or None to score every training example)", num_candidates)
    return num_candidates


def check_feature_choice(feature_fn: Any, knn_backend: str = DEFAULT_KNN_BACKEND) -> None:
    """``feature_fn`` is None, a callable or a named choice; ``"last_layer_grad"`` needs the torch backend."""
    expect(knn_backend in KNN_BACKENDS, "knn_backend", f"one of {KNN_BACKENDS}", knn_backend)
    if feature_fn is None or callable(feature_fn):
        return
    if feature_fn not in FEATURE_NAMES:
        raise ValueError(
            f"Expected `feature_fn` to be None (the default), {LAST_LAYER_GRAD!r} (last-layer loss gradients),"
            f" {ACTIVATIONS!r} (input of the last nn.Linear) or a callable (model, batch) -> Tensor[B, D], but got"
            f" {feature_fn!r}."
        )
    if feature_fn == LAST_LAYER_GRAD and knn_backend != "torch":
        raise ValueError(
            f"feature_fn={LAST_LAYER_GRAD!r} ranks by a factored gradient inner product that FAISS cannot index;"
            " use knn_backend='torch' (exact) with it, or the default activation features with FAISS."
        )


@dataclass(frozen=True)
class ExplainConfig:
    """What an analysis explains and how it scores; validated on construction.

    Attributes:
        top_k: harmful and helpful training examples reported per point.
        num_worst: highest-loss validation examples explained when ``val_indices`` is not given.
        val_indices: validation dataset indices to explain (overrides ``num_worst``).
        misclassified_only: pick the worst among misclassified validation examples only.
        scoring: how training examples are scored (one of :data:`SCORING_METHODS`).
        chunk_size: training examples scored at once (bounds memory).
        keep_full_scores: keep every score (each rank its shard) for the score files.
        diagnose: run the self-diagnosis (residuals, repeat agreement, warnings).
        num_candidates: FastIF: score each point only against its ``num_candidates`` nearest training examples.
        knn_backend: ``"torch"`` (exact) or ``"faiss"``.
        feature_fn: how neighbours are found: None (``"last_layer_grad"`` with torch, ``"activations"`` with
            FAISS), a named choice, or ``(model, batch) -> Tensor[B, D]``.
        preselect: with ``num_candidates``: ``"auto"`` preselects only when a timed probe estimates that it
            saves time and otherwise scores every training example (with a note); ``"always"`` preselects.
    """

    top_k: int = 10
    num_worst: int = 8
    val_indices: Optional[tuple[int, ...]] = None
    misclassified_only: bool = False
    scoring: str = DEFAULT_SCORING
    chunk_size: int = DEFAULT_CHUNK_SIZE
    keep_full_scores: bool = False
    diagnose: bool = True
    num_candidates: Optional[int] = None
    knn_backend: str = DEFAULT_KNN_BACKEND
    feature_fn: Union[Callable[..., Any], str, None] = None
    preselect: str = DEFAULT_PRESELECT

    def __post_init__(self) -> None:
        expect(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", "a positive int", self.top_k)
        expect(isinstance(self.num_worst, int) and self.num_worst >= 1, "num_worst", "a positive int", self.num_worst)
        if self.val_indices is not None:
            ok = len(self.val_indices) > 0 and all(isinstance(i, int) and i >= 0 for i in self.val_indices)
            expect(ok, "val_indices", "a non-empty list of validation dataset indices (ints >= 0)", self.val_indices)
            expect(len(set(self.val_indices)) == len(self.val_indices), "val_indices", "free of duplicates",
                   list(self.val_indices), "List each validation index once.")
        expect(self.scoring in SCORING_METHODS, "scoring", " or ".join(repr(m) for m in SCORING_METHODS), self.scoring)
        expect(isinstance(self.chunk_size, int) and self.chunk_size >= 1, "chunk_size", "a positive int",
               self.chunk_size)
        check_num_candidates(self.num_candidates)
        check_feature_choice(self.feature_fn, self.knn_backend)
        expect(self.preselect in PRESELECT_POLICIES, "preselect", " or ".join(repr(p) for p in PRESELECT_POLICIES),
               self.preselect, "'auto' falls back to scoring every example when candidates would not save time.")


@dataclass(frozen=True)
class CorrectionConfig:
    """What one correction run (:func:`~lightning_influence.correct_errors`) does; validated on construction.

    Attributes:
        iterations: rounds of (sample anchors, choose examples, fine-tune).
        anchors_per_iteration: anchors sampled (without replacement) per round; all of them if fewer exist.
        examples_per_iteration: training examples fine-tuned on per round.
        steps_per_iteration: optimizer steps per round, each on the mean loss of the chosen examples.
        selection: ``"helpful"`` (most negative influence), ``"harmful"`` (most positive), ``"random"``
            candidates, or ``"anchors"`` (fine-tune on the round's anchors themselves).
        seed: seeds anchor sampling and random selection (round i uses its own seed, derived from both).
        scoring: how candidates are scored (one of :data:`SCORING_METHODS`).
        chunk_size: training examples scored at once.
        num_candidates: FastIF candidate preselection: each round, score only the union of the
            ``num_candidates`` training examples closest to each sampled anchor (largest ``|<G_anchor, G_i>|`` of
            last-layer loss gradients); None scores all. ``"random"`` still draws from all allowed examples.
        curvature: the curvature of the s_test solves (``"gauss_newton"`` or ``"hessian"``).
    """

    iterations: int = 10
    anchors_per_iteration: int = 10
    examples_per_iteration: int = 10
    steps_per_iteration: int = 1
    selection: str = "helpful"
    seed: int = 0
    scoring: str = DEFAULT_SCORING
    chunk_size: int = DEFAULT_CHUNK_SIZE
    num_candidates: Optional[int] = None
    curvature: str = DEFAULT_CURVATURE

    def __post_init__(self) -> None:
        expect(isinstance(self.iterations, int) and self.iterations >= 0, "iterations", "an int >= 0", self.iterations)
        check_curvature(self.curvature)
        for name in ("anchors_per_iteration", "examples_per_iteration", "steps_per_iteration", "chunk_size"):
            value = getattr(self, name)
            expect(isinstance(value, int) and value >= 1, name, "a positive int", value)
        expect(self.selection in SELECTIONS, "selection", f"one of {SELECTIONS}", self.selection)
        expect(isinstance(self.seed, int), "seed", "an int", self.seed)
        expect(self.scoring in SCORING_METHODS, "scoring", " or ".join(repr(m) for m in SCORING_METHODS), self.scoring)
        check_num_candidates(self.num_candidates)


def solver_config(solver: Union[str, SolverConfig], options: Optional[dict[str, Any]] = None) -> SolverConfig:
    """A solver given as a config object (used as is) or as a name plus keyword options."""
    if isinstance(solver, (LissaConfig, CGConfig, ExactConfig, LowRankConfig)):
        if options:
            raise TypeError(f"Got solver options {sorted(options)} beside a solver config object {solver!r}: set them"
                            f" on the config, e.g. {type(solver).__name__}({', '.join(f'{k}=...' for k in options)}).")
        return solver
    expect(isinstance(solver, str), "solver", f"one of {SOLVERS} or a solver config (LissaConfig(...), ...)", solver)
    return make_solver_config(solver, dict(options or {}))


def solver_name(config: SolverConfig) -> str:
    """The name (``"lissa"``, ``"cg"``, ...) of a solver config."""
    return next(name for name, cls in _CONFIGS.items() if isinstance(config, cls))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config's fields as a plain dict (for reports)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


#: Training signals: the recording's forward passes use batches of at least this many examples (no gradients are
#: kept, so a batch larger than the training one costs little memory and saves per-batch overhead); a
#: ``batch_size`` given to the recorder's callback wins.
SIGNAL_MIN_BATCH_SIZE = 256
