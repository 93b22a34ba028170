"""The functional API: ``s_test``, ``influence``, ``top_influences`` and ``self_influence`` on an nn.Module.

Each function runs the same distributed steps as the callback (:mod:`lightning_influence.distributed`) with a
single-process collective, so a function call and a DDP run compute their answers with the same code.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DAMPING,
    DEFAULT_KNN_BACKEND,
    DEFAULT_PRESELECT,
    DEFAULT_SCORING,
    DEFAULT_SOLVER,
    ExplainConfig,
    ProblemConfig,
    SolverConfig,
    solver_config,
)
from lightning_influence.core.candidates import check_knn_backend
from lightning_influence.core.per_example.features import FeatureFn
from lightning_influence.core.per_example.losses import LossFn
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import Scorer, StreamingTopK, top_influences_of
from lightning_influence.core.tensors.batching import Batch, batch_size_of, slice_batch
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode
from lightning_influence.core.trajectory import AveragedScores, Snapshot
from lightning_influence.distributed.collectives import SingleProcess
from lightning_influence.distributed.scoring import choose_candidates, score_candidates, score_training_set
from lightning_influence.distributed.solve import solve_s_test, solve_snapshots
from lightning_influence.results import SolveInfo, STest, TopInfluences

SolverLike = Union[str, SolverConfig]
#: Options of the problem rather than of the solver: accepted by every function beside the solver's own.
PROBLEM_OPTIONS = ("curvature", "weight_decay", "allow_negative_curvature", "parameters", "dtype")


def make_problem(
    model: nn.Module, loss_fn: LossFn, train_loader: Iterable[Batch], solver: SolverLike, damping: Union[float, str],
    options: dict[str, Any], problem: Optional[ProblemConfig] = None,
) -> InfluenceProblem:
    """Validate the arguments shared by every public function and build the problem: from ``problem`` (a
    :class:`ProblemConfig`) or from ``solver``, ``damping`` and the problem and solver ``options`` (not both)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if problem is not None:
        loose = sorted(options) + [name for name, value, default in (("solver", solver, DEFAULT_SOLVER),
                                                                   ("damping", damping, DEFAULT_DAMPING))
                                   if value is not default and value != default]
        if loose:
            raise TypeError(f"Got {loose} beside `problem`: set them on the ProblemConfig instead.")
        return InfluenceProblem(model, loss_fn, train_loader, problem)
    problem_options = {k: options[k] for k in PROBLEM_OPTIONS if k in options}
    config = solver_config(solver, {k: v for k, v in options.items() if k not in PROBLEM_OPTIONS})
    return InfluenceProblem(model, loss_fn, train_loader, ProblemConfig(solver=config, damping=damping,
                                                                        **problem_options))


def solve_checked(problem: InfluenceProblem, gradients: torch.Tensor, caller: str) -> STest:
    """s_test of ``gradients`` in one process; warns (once per call) when the solve's own residual check says it
    did not converge, with the residual, the tolerance and what to try, as the reports do."""
    vectors, info = solve_s_test(problem, gradients, SingleProcess(), None)
    if not info.converged:
        warn_not_converged(info, caller)
    return STest(vectors, info)


def warn_not_converged(info: SolveInfo, caller: str) -> None:
    residual = "" if info.residual is None else f" (residual {info.residual:.3g} > tolerance {info.residual_tol:.3g})"
    warnings.warn(
        f"li.{caller}: the {info.solver} solve of s_test did not converge{residual}: the scores are unreliable."
        f" Try solver='cg' (damping {info.damping:.3g}), a larger `depth` for LiSSA or `max_iter` for CG, or a larger"
        " `damping`.", UserWarning, stacklevel=3)


def s_test(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    test_batch: Batch,
    *,
    solver: SolverLike = DEFAULT_SOLVER,
    damping: Union[float, str] = DEFAULT_DAMPING,
    problem: Optional[ProblemConfig] = None,
    **options: Any,
) -> STest:
    """Inverse-HVPs ``s_test = (H + damping I)^-1 grad L(z_test)`` for every example of ``test_batch``.

    Args:
        model: the trained module (analysed in ``eval()`` mode; its state is restored afterwards).
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses (no L2 term).
        train_loader: the training data defining ``H``.
        test_batch: one batch in the training batches' format.
        solver: ``"lissa"``, ``"cg"``, ``"exact"``, ``"lowrank"``, or a config object such as
            ``LissaConfig(depth=500)``.
        damping: lambda added to the curvature, or ``"auto"`` (the default: a fraction of its top eigenvalue,
            floored at ``weight_decay``; see docs/curvature.md).
        **options: ``curvature`` (``"gauss_newton"``, the default, or ``"hessian"``), ``weight_decay`` (the floor
            of the automatic damping), ``allow_negative_curvature`` (keep a damping below the Hessian's negative
            curvature instead of raising it); solver options with a solver name (see :class:`LissaConfig`,
            :class:`CGConfig`, ...), and
            ``parameters=`` to analyse only some trainable parameters (module-name prefixes or globs such as
            ``"classifier"`` or ``"*.lora_*"``, or a predicate ``(name, param) -> bool``; "influence through the last
            layers only", see docs/per-example.md) and ``dtype=`` (the analysis dtype: float32 by default whatever
            the training precision, ``torch.float64`` for references).
        problem: all of these problem knobs at once as a :class:`ProblemConfig` (then leave ``solver``, ``damping``
            and the problem options out).

    Warns (``UserWarning``, once per call) when the solve's own residual check says it did not converge.

    Returns:
        :class:`STest` with ``vectors`` ``[n_test, P]`` and a :class:`SolveInfo` record of the solve.
    """
    setup = make_problem(model, loss_fn, train_loader, solver, damping, options, problem)
    with analysis_mode(model):
        return solve_checked(setup, setup.gradients(test_batch), "s_test")


def _scoring_config(options: dict[str, Any], top_k: int, num_candidates: Optional[int], feature_fn: Any,
                    knn_backend: str, keep_full_scores: bool) -> tuple[ExplainConfig, dict[str, Any]]:
    """Split the scoring options off the solver options and validate them."""
    options = dict(options)
    if "candidates" in options:
        warnings.warn("`candidates=` is deprecated: pass `num_candidates=` (the same meaning).", DeprecationWarning,
                      stacklevel=3)
        num_candidates = options.pop("candidates")
    check_knn_backend(knn_backend)
    config = ExplainConfig(top_k=top_k, scoring=options.pop("scoring", DEFAULT_SCORING),
                           chunk_size=options.pop("chunk_size", DEFAULT_CHUNK_SIZE), keep_full_scores=keep_full_scores,
                           diagnose=False, num_candidates=num_candidates, knn_backend=knn_backend,
                           feature_fn=feature_fn, preselect=options.pop("preselect", DEFAULT_PRESELECT))
    return config, options


def influence(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    test_batch: Batch,
    *,
    solver: SolverLike = DEFAULT_SOLVER,
    damping: Union[float, str] = DEFAULT_DAMPING,
    num_candidates: Optional[int] = None,
    feature_fn: FeatureFn | str | None = None,
    knn_backend: str = DEFAULT_KNN_BACKEND,
    problem: Optional[ProblemConfig] = None,
    snapshots: Sequence[Snapshot] = (),
    **options: Any,
) -> torch.Tensor:
    """Influence ``I(z, z_test) = -s_test . grad L(z)`` of every training example on every test example.

    Positive = **harmful** (up-weighting z raises the test loss), negative = **helpful**. Removing z from
    training changes the test loss by about ``-I / n``.

    Takes the arguments of :func:`s_test`, plus ``scoring`` (``"auto"``, ``"factored"``, ``"jvp"``,
    ``"per_example_grad"``) and ``chunk_size`` (examples scored at once).

    ``num_candidates=k`` scores each test point only against its k nearest training examples (FastIF). By
    default (``feature_fn="last_layer_grad"``) these are the k largest ``|<G_test, G_i>|`` of last-layer loss
    gradients, factored and never materialised (see ``core.candidates``); ``feature_fn="activations"`` (the
    default with ``knn_backend="faiss"``) takes Euclidean neighbours of the input of the model's last
    ``nn.Linear`` layer, and a callable ``feature_fn(model, batch) -> Tensor[B, D]`` those of its features.
    Entries of training examples that are not a candidate of that test point are **NaN** (absent, not zero).
    With the default ``preselect="auto"`` the candidates are used only where a timed probe estimates that they
    save time; otherwise every training example is scored (exact, no NaN) and a ``UserWarning`` says so
    (``preselect="always"`` preselects whatever the cost).

    ``snapshots``: earlier weights of the same training run (:func:`~lightning_influence.take_snapshot` after
    some epochs); the scores are then the mean of the current weights' and each snapshot's own influence (its own
    gradients and s_test, at the damping the current weights resolved), which predicts retraining better on
    models stopped before convergence (docs/retraining.md). Each snapshot costs one more solve and scoring pass.

    Returns:
        ``[n_test, n_train]`` scores. With a ``DataLoader`` over a map-style dataset, column j is dataset index j
        (the loader's shuffling is ignored, as in the callback); for any other iterable of batches, columns
        follow its iteration order.
    """
    settings, options = _scoring_config(options, 1, num_candidates, feature_fn, knn_backend, keep_full_scores=True)
    setup = make_problem(model, loss_fn, train_loader, solver, damping, options, problem)
    data = _indexed(train_loader, settings)
    with analysis_mode(model):
        vectors = solve_checked(setup, setup.gradients(test_batch), "influence").vectors
        scorer = _scorer(setup, loss_fn, train_loader, test_batch, snapshots, "influence")
        if data is None:
            return _stream_scores(scorer, vectors, settings)
        found = _candidate_scores(setup, scorer, data, vectors, test_batch, settings, loss_fn)
        if found is not None:
            indices, scores = found
            table = scores.new_full((scores.shape[0], len(data)), float("nan"))
            return table.scatter_(1, indices, scores)
        _, _, shard = score_training_set(scorer, data, vectors, settings, SingleProcess(), None)
    assert shard is not None  # keep_full_scores=True
    return shard.scores[:, shard.train_indices.argsort()]


def top_influences(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    test_batch: Batch,
    *,
    top_k: int = 10,
    solver: SolverLike = DEFAULT_SOLVER,
    damping: Union[float, str] = DEFAULT_DAMPING,
    num_candidates: Optional[int] = None,
    feature_fn: FeatureFn | str | None = None,
    knn_backend: str = DEFAULT_KNN_BACKEND,
    problem: Optional[ProblemConfig] = None,
    snapshots: Sequence[Snapshot] = (),
    **options: Any,
) -> TopInfluences:
    """The ``top_k`` most harmful and most helpful training examples per test example, streamed.

    Same arguments as :func:`influence`; never holds the ``[n_test, n_train]`` matrix. Indices are dataset
    indices for a ``DataLoader`` (positions in iteration order for other iterables). With ``num_candidates=k``
    each test point's lists are drawn from its own k candidates only (so at most k entries, and the two lists
    can overlap when ``k < 2 * top_k``). ``snapshots``: as in :func:`influence`.
    """
    settings, options = _scoring_config(options, top_k, num_candidates, feature_fn, knn_backend, keep_full_scores=False)
    setup = make_problem(model, loss_fn, train_loader, solver, damping, options, problem)
    data = _indexed(train_loader, settings)
    with analysis_mode(model):
        vectors = solve_checked(setup, setup.gradients(test_batch), "top_influences").vectors
        scorer = _scorer(setup, loss_fn, train_loader, test_batch, snapshots, "top_influences")
        if data is None:
            stream = StreamingTopK(vectors.shape[0], top_k)
            stream.update(_stream_scores(scorer, vectors, settings), torch.arange(_count(setup)))
            return stream.result()
        found = _candidate_scores(setup, scorer, data, vectors, test_batch, settings, loss_fn)
        if found is not None:
            return top_influences_of(found[1], found[0], top_k)
        top, _, _ = score_training_set(scorer, data, vectors, settings, SingleProcess(), None)
    return top


def _scorer(problem: InfluenceProblem, loss_fn: LossFn, train_loader: Iterable[Batch], test_batch: Batch,
            snapshots: Sequence[Snapshot], caller: str) -> Scorer:
    """The problem itself, or with ``snapshots`` the influence averaged over them and the current weights (each
    snapshot's solve warns like the current one's when it did not converge)."""
    if not snapshots:
        return problem
    members = solve_snapshots(problem.model, loss_fn, train_loader, problem.settings, problem.damping, test_batch,
                              snapshots, SingleProcess())
    for member in members:
        if not member.info.converged:
            warn_not_converged(member.info, caller)
    return AveragedScores(problem, problem.model, members)


def _candidate_scores(problem: InfluenceProblem, scorer: Scorer, data: IndexedData, vectors: torch.Tensor,
                      test_batch: Batch, settings: ExplainConfig, loss_fn: LossFn
                      ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Each test point's candidates ``[q, k]`` (training indices) and their scores ``[q, k]``; None without
    ``num_candidates``, or when ``preselect="auto"`` found scoring every example cheaper (it warns)."""
    if settings.num_candidates is None:
        return None
    neighbours, _ = choose_candidates(problem, test_batch, vectors, data, settings, SingleProcess(), loss_fn)
    if neighbours is None:
        return None
    _, scores = score_candidates(scorer, data, vectors, neighbours, settings, SingleProcess(), None)
    return neighbours.indices, scores


def _indexed(train_loader: Iterable[Batch], settings: ExplainConfig) -> Optional[IndexedData]:
    """The loader's dataset with indices (None for an iterable that is not a DataLoader over a map-style dataset)."""
    if isinstance(train_loader, DataLoader):
        try:
            return IndexedData.from_loader(train_loader)
        except TypeError:
            pass
    if settings.num_candidates is not None:
        raise TypeError(
            f"Expected `train_loader` to be a torch DataLoader over a map-style dataset when `num_candidates` is set"
            f" (candidates are picked by dataset index), but got {type(train_loader).__name__}."
        )
    return None


def _stream_scores(problem: Scorer, vectors: torch.Tensor, settings: ExplainConfig) -> torch.Tensor:
    """Scores over a plain iterable of batches, in its iteration order."""
    blocks = list(problem.scores(vectors, method=settings.scoring, chunk_size=settings.chunk_size))
    if not blocks:
        raise ValueError("Expected the training data to hold at least one example, but it is empty.")
    return torch.cat(blocks, dim=1)


def _count(problem: InfluenceProblem) -> int:
    return sum(batch_size_of(batch) for batch in problem.train_batches())


def self_influence(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    *,
    solver: SolverLike = "lowrank",
    damping: Union[float, str] = DEFAULT_DAMPING,
    chunk_size: int = 64,
    problem: Optional[ProblemConfig] = None,
    **options: Any,
) -> torch.Tensor:
    """Self-influence ``I(z, z) = -grad L(z)^T (H + damping I)^-1 grad L(z)`` of every training example.

    ``solver="lowrank"`` (the default, the scalable choice) takes the top ``rank`` eigenpairs of H by Lanczos and
    then needs one pass of per-example gradients:
    ``g^T A^-1 g ~= sum_j (q_j . g)^2 / (w_j + damping) + ||g - Q Q^T g||^2 / damping``; ``"exact"`` uses one
    eigendecomposition for all examples (small models, the reference). ``"cg"``/``"lissa"``
    solve one system per example (in chunks of ``chunk_size``): slow on large training sets.

    These are the final weights' scores only: on nets that memorise their labels the training signals that
    ``MislabelCallback(candidates=...)`` records during the run rank flipped labels better (the
    figures are in ``lightning_influence.config.NO_SIGNALS_NOTE`` and ``docs/mislabel.md``).

    Returns:
        ``[n_train]`` scores in ``train_loader``'s order. Large ``|I(z, z)|`` marks likely mislabelled examples.
    """
    setup = make_problem(model, loss_fn, train_loader, solver, damping, options, problem)
    results, unconverged = [], []
    with analysis_mode(model):
        for batch in setup.train_batches():
            for start in range(0, batch_size_of(batch), chunk_size):
                scores, info = setup.self_influence(setup.gradients(slice_batch(batch, start, start + chunk_size)))
                results.append(scores)
                if info is not None and not info.converged:
                    unconverged.append(info)
    if unconverged:
        warn_not_converged(max(unconverged, key=lambda i: i.residual or 0.0), "self_influence")
    return torch.cat(results)
