"""The functional API: ``s_test``, ``influence``, ``top_influences`` and ``self_influence`` on an nn.Module."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.core.batching import Batch, batch_size_of, slice_batch
from lightning_influence.core.candidates import (
    CandidateScoreCollector,
    CandidateScores,
    FeatureFn,
    check_candidates,
    check_knn_backend,
    collect_candidate_scores,
    select_candidates,
)
from lightning_influence.core import defaults
from lightning_influence.core.config import STest, check_damping, make_solver_config
from lightning_influence.core.data import IndexedData
from lightning_influence.core.losses import LossFn
from lightning_influence.core.params import analysis_mode
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import StreamingTopK, TopInfluences, top_influences_of

#: Damping used when none is given: ``"auto"`` (a fraction of the curvature's top eigenvalue, see core.damping).
DEFAULT_DAMPING = defaults.DEFAULT_DAMPING
#: Options every solver takes, passed to :class:`InfluenceProblem` rather than to the solver config.
PROBLEM_OPTIONS = ("curvature", "weight_decay", "allow_negative_curvature")


def make_problem(
    model: nn.Module, loss_fn: LossFn, train_loader: Iterable[Batch], solver: str, damping: float | str,
    options: dict[str, Any],
) -> InfluenceProblem:
    """Validate the arguments shared by every public function and build the problem.

    ``options`` may hold ``curvature`` (default ``"gauss_newton"``), ``weight_decay`` and
    ``allow_negative_curvature`` besides the solver's own options.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    problem_options = {k: options[k] for k in PROBLEM_OPTIONS if k in options}
    config = make_solver_config(solver, {k: v for k, v in options.items() if k not in PROBLEM_OPTIONS})
    return InfluenceProblem(model, loss_fn, train_loader, check_damping(damping), config, **problem_options)


def s_test(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    test_batch: Batch,
    *,
    solver: str = "lissa",
    damping: float | str = DEFAULT_DAMPING,
    **options: Any,
) -> STest:
    """Inverse-HVPs ``s_test = (H + damping I)^-1 grad L(z_test)`` for every example of ``test_batch``.

    Args:
        model: the trained module (analysed in ``eval()`` mode; its state is restored afterwards).
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses (no L2 term).
        train_loader: the training data defining ``H``.
        test_batch: one batch in the training batches' format.
        solver: ``"lissa"``, ``"cg"`` or ``"exact"``.
        damping: lambda added to the curvature, or ``"auto"`` (default: a fraction of its top eigenvalue).
        **options: solver options (see :class:`LissaConfig`, :class:`CGConfig`, :class:`ExactConfig`), and
            ``curvature`` (``"gauss_newton"``, the default, or ``"hessian"``), ``weight_decay`` (floor of the
            automatic damping), ``allow_negative_curvature``.

    Returns:
        :class:`STest` with ``vectors`` ``[n_test, P]`` and a :class:`SolveInfo` record of the solve.
    """
    problem = make_problem(model, loss_fn, train_loader, solver, damping, options)
    with analysis_mode(model):
        return problem.solve(problem.gradients(test_batch))


def _split_scoring(options: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    options = dict(options)
    return options.pop("scoring", "auto"), options.pop("chunk_size", 256), options


def influence(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    test_batch: Batch,
    *,
    solver: str = "lissa",
    damping: float | str = DEFAULT_DAMPING,
    candidates: Optional[int] = None,
    feature_fn: FeatureFn | str | None = None,
    knn_backend: str = "torch",
    **options: Any,
) -> torch.Tensor:
    """Influence ``I(z, z_test) = -s_test . grad L(z)`` of every training example on every test example.

    Positive = **harmful** (up-weighting z raises the test loss), negative = **helpful**. Removing z from
    training changes the test loss by about ``-I / n``.

    Takes the arguments of :func:`s_test`, plus ``scoring`` (``"auto"``, ``"jvp"``, ``"per_example_grad"``) and
    ``chunk_size`` (examples scored at once).

    ``candidates=k`` scores each test point only against its k nearest training examples (FastIF). By default
    (``feature_fn="last_layer_grad"``) these are the k largest ``|<G_test, G_i>|`` of last-layer loss gradients,
    factored and never materialised (see ``core.candidates``); ``feature_fn="activations"`` (the default with
    ``knn_backend="faiss"``) takes Euclidean neighbours of the input of the model's last ``nn.Linear`` layer,
    and a callable ``feature_fn(model, batch) -> Tensor[B, D]`` those of its features. Neighbours are exact
    (``knn_backend="torch"``; or ``"faiss"``). Entries of
    training examples that are not a candidate of that test point are **NaN** (absent, not zero). Needs a
    ``DataLoader`` over a map-style dataset; columns are then dataset indices.

    Returns:
        ``[n_test, n_train]`` scores; columns follow ``train_loader``'s iteration order.
    """
    scoring, chunk_size, options = _split_scoring(options)
    problem = make_problem(model, loss_fn, train_loader, solver, damping, options)
    if candidates is not None:
        found, n_train = _candidate_influence(
            problem, test_batch, candidates, feature_fn, knn_backend, scoring, chunk_size
        )
        return found.dense(n_train)
    with analysis_mode(model):
        s = problem.solve(problem.gradients(test_batch)).vectors
        blocks = list(problem.scores(s, method=scoring, chunk_size=chunk_size))
    if not blocks:
        raise ValueError("Expected the training data to hold at least one example, but it is empty.")
    return torch.cat(blocks, dim=1)


def top_influences(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    test_batch: Batch,
    *,
    top_k: int = 10,
    solver: str = "lissa",
    damping: float | str = DEFAULT_DAMPING,
    candidates: Optional[int] = None,
    feature_fn: FeatureFn | str | None = None,
    knn_backend: str = "torch",
    **options: Any,
) -> TopInfluences:
    """The ``top_k`` most harmful and most helpful training examples per test example, streamed.

    Same arguments as :func:`influence`; never holds the ``[n_test, n_train]`` matrix. Indices are positions in
    ``train_loader``'s iteration order. With ``candidates=k`` each test point's lists are drawn from its own k
    candidates only (so at most k entries, and the two lists can overlap when ``k < 2 * top_k``).
    """
    scoring, chunk_size, options = _split_scoring(options)
    problem = make_problem(model, loss_fn, train_loader, solver, damping, options)
    if candidates is not None:
        found, _ = _candidate_influence(problem, test_batch, candidates, feature_fn, knn_backend, scoring, chunk_size)
        return top_influences_of(found.scores, found.indices, top_k)
    with analysis_mode(model):
        s = problem.solve(problem.gradients(test_batch)).vectors
        top = StreamingTopK(s.shape[0], top_k)
        position = 0
        for block in problem.scores(s, method=scoring, chunk_size=chunk_size):
            top.update(block, torch.arange(position, position + block.shape[1]))
            position += block.shape[1]
    return top.result()


def _candidate_influence(
    problem: InfluenceProblem,
    test_batch: Batch,
    candidates: int,
    feature_fn: FeatureFn | str | None,
    knn_backend: str,
    scoring: str,
    chunk_size: int,
) -> tuple[CandidateScores, int]:
    """s_test, then the scores of each test point's k nearest training examples (the union scored once)."""
    loader = problem.train_loader
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"Expected `train_loader` to be a torch DataLoader over a map-style dataset when `candidates` is set"
            f" (candidates are picked by dataset index), but got {type(loader).__name__}."
        )
    data = IndexedData.from_loader(loader)
    check_candidates(candidates, len(data))
    check_knn_backend(knn_backend)
    with analysis_mode(problem.model):
        neighbours = select_candidates(
            problem.model, test_batch, data.batches_with_indices(), candidates, feature_fn, knn_backend, problem.device,
            problem.loss.loss_fn,
        )
        s = problem.solve(problem.gradients(test_batch)).vectors
        collector = CandidateScoreCollector(neighbours.indices, s.dtype)
        collect_candidate_scores(problem, data, s, collector, collector.union(), scoring, chunk_size)
    return collector.result(), len(data)


def self_influence(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Iterable[Batch],
    *,
    solver: str = "exact",
    damping: float | str = DEFAULT_DAMPING,
    chunk_size: int = 64,
    **options: Any,
) -> torch.Tensor:
    """Self-influence ``I(z, z) = -grad L(z)^T (H + damping I)^-1 grad L(z)`` of every training example.

    ``solver="exact"`` uses one eigendecomposition for all examples (small models); ``"lowrank"`` (the scalable
    choice) takes the top ``rank`` eigenpairs of H by Lanczos and then needs one pass of per-example gradients:
    ``g^T A^-1 g ~= sum_j (q_j . g)^2 / (w_j + damping) + ||g - Q Q^T g||^2 / damping``. ``"cg"``/``"lissa"``
    solve one system per example (in chunks of ``chunk_size``): slow on large training sets.

    Returns:
        ``[n_train]`` scores in ``train_loader``'s order. Large ``|I(z, z)|`` marks likely mislabelled examples.
    """
    problem = make_problem(model, loss_fn, train_loader, solver, damping, options)
    results = []
    with analysis_mode(model):
        for batch in problem.train_batches():
            for start in range(0, batch_size_of(batch), chunk_size):
                grads = problem.gradients(slice_batch(batch, start, start + chunk_size))
                inverse = problem.inverse_operator()
                if inverse is not None:
                    results.append(-inverse.quadratic_forms(grads))
                else:
                    results.append(-(problem.solve(grads).vectors * grads).sum(dim=1))
    return torch.cat(results)
