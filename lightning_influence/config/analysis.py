"""What an analysis explains and how it scores (``ExplainConfig``), and what a correction run does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning_influence.config.defaults import (
    ACTIVATIONS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CURVATURE,
    DEFAULT_KNN_BACKEND,
    DEFAULT_PRESELECT,
    DEFAULT_SCORING,
    FEATURE_NAMES,
    KNN_BACKENDS,
    LAST_LAYER_GRAD,
    PRESELECT_POLICIES,
    SCORING_METHODS,
    SELECTIONS,
    expect,
)
from lightning_influence.config.problem import check_curvature


def check_num_candidates(num_candidates: Optional[int], n_train: Optional[int] = None) -> Optional[int]:
    """The one check of ``num_candidates`` (FastIF's kNN width) for every entry point: None or a positive int, and
    at most ``n_train`` once the training set is known. The configs that carry it (:class:`ExplainConfig`,
    :class:`CorrectionConfig`) run the first part on construction; the data-dependent bound runs where the
    training set meets the config (before training in the callback, before the first round in ``correct_errors``,
    and at the neighbour search of every analysis).

    Raises:
        ValueError: "Expected `num_candidates` to be ..., but got ..." with what to pass instead.
    """
    what = "None or a positive int (the nearest training examples scored per test point)"
    hint = "Pass a count such as num_candidates=100, or num_candidates=None to score every training example."
    ok = num_candidates is None or (isinstance(num_candidates, int) and not isinstance(num_candidates, bool)
                                    and num_candidates >= 1)
    expect(ok, "num_candidates", what, num_candidates, hint)
    if n_train is not None and num_candidates is not None:
        expect(num_candidates <= n_train, "num_candidates", f"at most the training-set size {n_train}",
               num_candidates, "Pass a smaller count, or num_candidates=None to score every training example.")
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
            candidates, ``"anchors"`` (fine-tune on the round's anchors themselves), ``"weighted"`` (helpful, each
            loss weighted by its influence), ``"anchors+helpful"`` / ``"anchors+random"`` (the anchors together
            with helpful / random training examples), ``"anchors+protect"`` (the anchors together with the
            training examples most helpful to the guard among those not harmful to the anchors), ``"influence"`` (the
            anchors, each step along ``(H + damping I)^-1 grad L_A``, the parameter change influence predicts for
            up-weighting them in training, scaled to lower their loss to first order as much as their gradient
            step; see :mod:`lightning_influence.analysis.correction_direction`), ``"constrained"`` (the anchors, each
            step along their own gradient, changed as little as possible so that it raises none of the protect sample's
            losses to first order, one constraint per example, and scaled back to the gradient step's first-order
            decrease of the anchors' loss).
        seed: seeds anchor sampling and random selection (round i uses its own seed, derived from both).
        scoring: how candidates are scored (one of :data:`SCORING_METHODS`).
        chunk_size: training examples scored at once.
        num_candidates: FastIF candidate preselection: each round, score only the union of the
            ``num_candidates`` training examples closest to each sampled anchor (largest ``|<G_anchor, G_i>|`` of
            last-layer loss gradients); None scores all. ``"random"`` still draws from all allowed examples.
        curvature: the curvature of the s_test solves (``"gauss_newton"`` or ``"hessian"``).
        lr: learning rate of the fresh optimizer, or ``"auto"``: a backtracking line search on the anchors
            before the first round (see :mod:`lightning_influence.analysis.correction_lr`).
        optimizer: the fresh optimizer, ``"sgd"`` or ``"adam"``.
        guard_per_iteration: validation examples outside the slice (ones the model got right before the run)
            sampled per round; the influence selections then skip examples that would raise their mean loss.
            0 turns the guard off.
        reuse_s_test: solve s_test in the first round only and reuse it (the scores stay fresh).
        project_replay: for the ``"anchors+..."`` selections, weight the anchors' mean loss in each step so that the
            chosen examples' gradient cannot slow the anchors: the part of it opposing the anchors' gradient is
            cancelled, and the step lowers the anchors' loss, to first order, as fast as a step on the anchors alone.
        protect_per_step: before each optimizer step of the influence selections, the guard examples the model got
            right before the run and still gets right are ranked by their loss, and the ``protect_per_step`` with
            the largest (the ones closest to flipping) form the protect sample; when the step's gradient would raise
            their mean loss to first order, its component along their gradient is removed (as in A-GEM;
            ``"constrained"``: one constraint per protect example, as in GEM). Needs a
            guard; 0 turns it off. The baselines (``"anchors"``, ``"anchors+random"``, ``"random"``, ``"harmful"``)
            never use it.
    """

    iterations: int = 10
    anchors_per_iteration: int = 10
    examples_per_iteration: int = 10
    steps_per_iteration: int = 1
    selection: str = "anchors+helpful"  # chosen by benchmarks/error-correction-study-results.json
    seed: int = 0
    scoring: str = DEFAULT_SCORING
    chunk_size: int = DEFAULT_CHUNK_SIZE
    num_candidates: Optional[int] = None
    curvature: str = DEFAULT_CURVATURE
    lr: Union[float, str] = "auto"
    optimizer: str = "sgd"
    guard_per_iteration: int = 50  # chosen by benchmarks/error-correction-study-results.json (docs/error-correction.md)
    reuse_s_test: bool = False
    project_replay: bool = True  # chosen by benchmarks/error-correction-study-results.json (docs/error-correction.md)
    protect_per_step: int = 10  # chosen by benchmarks/error-correction-protect-results.json (docs/error-correction.md)

    def __post_init__(self) -> None:
        expect(isinstance(self.iterations, int) and self.iterations >= 0, "iterations", "an int >= 0", self.iterations)
        lr_ok = self.lr == "auto" or (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                                      and self.lr > 0)
        expect(lr_ok, "lr", "a positive number or 'auto' (a line search on the anchors)", self.lr)
        expect(self.optimizer in ("sgd", "adam"), "optimizer", "'sgd' or 'adam'", self.optimizer)
        expect(isinstance(self.guard_per_iteration, int) and self.guard_per_iteration >= 0, "guard_per_iteration",
               "an int >= 0 (0: no guard)", self.guard_per_iteration)
        expect(isinstance(self.reuse_s_test, bool), "reuse_s_test", "a bool", self.reuse_s_test)
        expect(isinstance(self.project_replay, bool), "project_replay", "a bool", self.project_replay)
        expect(isinstance(self.protect_per_step, int) and not isinstance(self.protect_per_step, bool)
               and self.protect_per_step >= 0, "protect_per_step", "an int >= 0 (0: off)", self.protect_per_step)
        check_curvature(self.curvature)
        for name in ("anchors_per_iteration", "examples_per_iteration", "steps_per_iteration", "chunk_size"):
            value = getattr(self, name)
            expect(isinstance(value, int) and value >= 1, name, "a positive int", value)
        expect(self.selection in SELECTIONS, "selection", f"one of {SELECTIONS}", self.selection)
        expect(isinstance(self.seed, int), "seed", "an int", self.seed)
        expect(self.scoring in SCORING_METHODS, "scoring", " or ".join(repr(m) for m in SCORING_METHODS), self.scoring)
        check_num_candidates(self.num_candidates)


