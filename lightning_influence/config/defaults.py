"""Every default of the package, defined once (torch-free), and the one error helper every config uses."""

from __future__ import annotations

from typing import Any

SOLVERS = ("lissa", "cg", "exact", "lowrank")
SCORING_METHODS = ("auto", "hooks", "factored", "jvp", "per_example_grad")
#: Curvature used when none is given: the generalised Gauss-Newton matrix (positive semi-definite).
DEFAULT_CURVATURE = "gauss_newton"
CURVATURES = ("gauss_newton", "hessian")
#: ``damping="auto"`` (the default) is ``AUTO_DAMPING_FRACTION`` times the curvature's top eigenvalue, floored at
#: the optimizer's weight decay and never above ``MAX_DAMPING_FRACTION`` times the top eigenvalue. Measured in
#: ``benchmarks/curvature.py`` (``benchmarks/curvature-results.json``), explained in ``docs/curvature.md``.
DEFAULT_DAMPING = "auto"
#: The callbacks' damping: chosen by retraining (``lightning_influence.analysis.damping_check``): among
#: ``SELF_CHECK_CANDIDATES``, the damping whose influence on ``SELF_CHECK_POINTS`` validation points best predicts
#: ``SELF_CHECK_RETRAININGS`` warm-started retrainings on random halves of the training set, each for half the
#: epochs trained so far. Measured in ``benchmarks/lds.py`` (``benchmarks/lds-results.json``, docs/retraining.md).
SELF_CHECK_DAMPING = "self_check"
CALLBACK_DAMPING = SELF_CHECK_DAMPING
SELF_CHECK_CANDIDATES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: The callback's influence is averaged over this many weight snapshots spread evenly over the fit, the final weights
#: included (``lightning_influence.core.trajectory``; 1: the final weights alone). Measured in ``benchmarks/lds.py``.
CALLBACK_SNAPSHOTS = 3
SELF_CHECK_RETRAININGS = 10
SELF_CHECK_POINTS = 32
SELF_CHECK_SEED = 20_241
#: On models too large for the check's dense solve, each candidate is solved by preconditioned conjugate gradient
#: over the whole training set; together these solves may take at most ``SELF_CHECK_SOLVE_BUDGET`` times the
#: retrainings' time, or ``SELF_CHECK_SOLVE_FLOOR_SECONDS`` when that is more (each candidate gets the iterations
#: that fit). When fewer than ``SELF_CHECK_MIN_ITERATIONS``
#: fit, the check stops with an error that says so (the callback then warns and uses ``damping="auto"``): a
#: curvature product over a large training set can cost tens of epochs (``benchmarks/scale_units.py``).
SELF_CHECK_SOLVE_BUDGET = 4.0
SELF_CHECK_SOLVE_FLOOR_SECONDS = 60.0
SELF_CHECK_MIN_ITERATIONS = 5
AUTO_DAMPING_FRACTION = 0.03
MAX_DAMPING_FRACTION = 0.1
#: Training examples (a fixed seeded subset) that LiSSA's early-stop residual checks average over.
SUBSET_EXAMPLES = 2048
#: Training examples (a fixed seeded subsample, the same whatever the training set's size N) that the curvature
#: estimates average over: the spectrum behind ``damping="auto"`` (and the Hessian's negative-curvature check) and
#: the low-rank solver's Lanczos (the mislabel self-influence). Their cost is fixed in N; the solves' residual
#: verdict still reads the whole set. The subsample's top eigenvalue against the whole set's is tested in
#: ``tests/unit/core/test_curvature_estimates.py``; the reports' damping rule names the examples used.
CURVATURE_EXAMPLES = 512
#: Spectrum estimates kept per process, keyed on a fingerprint of the weights (every parameter and buffer), the
#: losses of the subsample's first batch, the curvature and the subsample: analyses of the same weights (the
#: influence and the mislabel callbacks at the end of a fit) estimate it once.
SPECTRUM_CACHE_SIZE = 8
SUBSET_SEED = 0
#: Lanczos steps for the extreme eigenvalues of the Hessian (the damping rule and the negative-curvature check).
SPECTRUM_STEPS = 30
#: Lanczos steps for the Gauss-Newton curvature, where ``damping="auto"`` needs only the top eigenvalue: it is
#: separated from the bulk and agreed to 4 digits after 8 steps on every model of ``benchmarks/models.py``.
TOP_EIGENVALUE_STEPS = 10
#: With ``curvature="hessian"``, damping below ``|lambda_min|`` is raised to this multiple of ``|lambda_min|``.
NEGATIVE_CURVATURE_MARGIN = 1.25
#: ``converged`` means ``max_rows ||(C + damping I) x - v|| / ||v|| <= RESIDUAL_TOL`` over the whole training set
#: (LiSSA's early-stop checks use the subset above).
RESIDUAL_TOL = 0.05
#: LiSSA checks that residual every ``CHECK_EVERY`` steps of a repeat and stops the repeat once it is met (a check
#: costs one curvature product per check-subset batch, about a tenth of the steps between checks on digits).
CHECK_EVERY = 50
#: With ``LissaConfig(shrink_batch=True)`` (off by default), where LiSSA's recursion runs on a training set larger
#: than its check subset, its steps may use a smaller minibatch than ``batch_size``: each of these sizes (below
#: ``batch_size``) has its scale probed like ``scale="auto"``'s, and the size of least predicted work
#: (``series_steps(scale_b) x b`` example products) is kept. A step costs about ``b`` examples' products and the
#: steps needed follow ``scale / damping``, which on the 1.0M-parameter CNN of ``benchmarks/scale.py`` hardly grows
#: from 128 to 32 examples (``benchmarks/scale_lissa.py``, ``benchmarks/scale-lissa-results.json``).
LISSA_STEP_BATCHES = (16, 32, 64)
#: LiSSA's early-stop checks on a check subset smaller than the training set read it in its seeded random order
#: until every row is ``VERDICT_Z`` standard errors clear of the tolerance, reading at least this many examples (a
#: check far above the tolerance, as the early ones are, costs this many examples instead of the whole subset).
CHECK_MIN_EXAMPLES = 512
#: LiSSA restarts after a divergence (raising ``scale``, or damping under ``"hessian"``) before it raises.
MAX_RETRIES = 3
DEFAULT_SOLVER = "lissa"
#: Fewest and most conjugate-gradient steps of LiSSA's refinement (``LissaConfig.refine``) after the repeats missed
#: the residual tolerance; between the two, about the repeats' own number of example products (see
#: ``LissaSolver.refine_budget``), so a refinement at most doubles a solve's cost on a large training set.
REFINE_MIN_ITER = 20
REFINE_MAX_ITER = 500
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
    " against {ts[0]}-{ts[1]}). Record them during training with MislabelCallback(candidates=...)."
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
#: Fine-tuning choices of :func:`~lightning_influence.correct_errors` (docs/error-correction.md says what each does).
SELECTIONS = ("helpful", "random", "anchors", "harmful", "weighted", "anchors+helpful", "anchors+random",
              "anchors+protect", "influence", "constrained")
#: The selections that step on the round's sampled anchors alone (their chosen indices are anchor indices).
ANCHOR_SELECTIONS = ("anchors", "influence", "constrained")


def expect(ok: bool, name: str, allowed: str, value: Any, hint: str = "") -> None:
    if not ok:
        raise ValueError(f"Expected `{name}` to be {allowed}, but got {value!r}.{(' ' + hint) if hint else ''}")
#: Training signals: the recording's forward passes use batches of at least this many examples (no gradients are
#: kept, so a batch larger than the training one costs little memory and saves per-batch overhead); a
#: ``batch_size`` given to the recorder's callback wins.
SIGNAL_MIN_BATCH_SIZE = 256
