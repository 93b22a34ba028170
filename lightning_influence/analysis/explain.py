"""Explain validation points by training examples: the analysis the callback runs, on every rank.

Data flows one way: validation losses -> monitored points -> s_test -> training scores (a shard per rank)
-> merged top-k -> result records. Lightning-free: ranks talk only through a :class:`Collectives`; the
distributed steps live in :mod:`lightning_influence.distributed`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from lightning_influence.analysis.diagnostics import diagnose
from lightning_influence.config import ExplainConfig, ProblemConfig, config_to_dict
from lightning_influence.core.candidates import Neighbours
from lightning_influence.core.per_example.losses import LossFn, call_loss_fn, check_finite_losses
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.scoring import Scorer
from lightning_influence.core.tensors.batching import (
    Batch,
    Description,
    describe_batch,
    keeps_input,
    prepare_batch,
    row_value,
)
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.core.tensors.modes import analysis_mode, check_state_unchanged, state_snapshot
from lightning_influence.core.trajectory import AveragedScores, Snapshot, joined_verdict
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.distributed.scoring import (
    candidate_score_shard,
    choose_candidates,
    score_candidates,
    score_training_set,
)
from lightning_influence.distributed.sharding import gather_checked, shard
from lightning_influence.distributed.solve import solve_s_test_with_halves, solve_snapshots
from lightning_influence.results import (
    ExplainedPoint,
    Explanation,
    Influencer,
    ScoreShard,
    SolveInfo,
    TopInfluences,
    TrustReport,
    TrustWarning,
)

Describe = Callable[[nn.Module, Batch], Description]


def validation_losses(
    model: nn.Module, loss_fn: LossFn, val: IndexedData, device: torch.device, collectives: Collectives
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-example losses (and predictions) of the whole validation set, each rank a shard, gathered."""

    def local_losses() -> list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        local = []
        for indices, batch in val.batches_with_indices(shard(range(len(val)), collectives.rank, collectives.world_size)):
            batch = prepare_batch(batch, device)
            with torch.no_grad():
                losses = check_finite_losses(call_loss_fn(loss_fn, model, batch), indices, "validation")
            predictions = describe_batch(model, batch).predictions
            local.append((indices, losses.detach().cpu(), None if predictions is None else predictions.cpu()))
        return local

    _, gathered = gather_checked(collectives, local_losses)
    parts = [part for rank_parts in gathered for part in rank_parts]
    if not parts:
        raise ValueError("Expected a non-empty validation set to pick points to explain, but it has no examples.")
    indices = torch.cat([p[0] for p in parts])
    order = indices.argsort()
    losses = torch.cat([p[1] for p in parts])[order]
    has_predictions = all(p[2] is not None for p in parts)
    predictions = torch.cat([p[2] for p in parts])[order] if has_predictions else None
    return indices[order], losses, predictions


def select_points(
    settings: ExplainConfig, val: IndexedData, losses: torch.Tensor, predictions: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
) -> list[int]:
    """The validation indices to explain: the given ones, or the highest-loss (misclassified) examples."""
    if settings.val_indices is not None:
        outside = [i for i in settings.val_indices if not 0 <= i < len(val)]
        if outside:
            raise ValueError(
                f"Expected `val_indices` to be indices into the validation dataset (0 to {len(val) - 1}), but got"
                f" {outside}. Pick indices below {len(val)}, or leave `val_indices` unset to explain the worst points."
            )
        return list(settings.val_indices)
    eligible = torch.ones_like(losses, dtype=torch.bool)
    if settings.misclassified_only and predictions is not None and labels is not None:
        eligible = predictions != labels
    ranked = torch.where(eligible, losses, torch.full_like(losses, -float("inf"))).argsort(descending=True, stable=True)
    count = min(settings.num_worst, int(eligible.sum()))
    return ranked[:count].tolist()


def _influencers(
    model: nn.Module, loss_fn: LossFn, train: IndexedData, indices: torch.Tensor, scores: torch.Tensor,
    device: torch.device, describe: Describe,
) -> tuple[Influencer, ...]:
    batch = prepare_batch(train.fetch(indices.tolist()), device)
    with torch.no_grad():
        losses = loss_fn(model, batch).detach().cpu()
    info = describe(model, batch)
    images = info.inputs is not None and keeps_input(info.inputs[0])  # images and small inputs
    return tuple(
        Influencer(
            train_index=int(index),
            influence=float(score),
            label=row_value(info.labels, row),
            prediction=row_value(info.predictions, row),
            loss=float(losses[row]),
            input=info.inputs[row].detach().cpu() if images and info.inputs is not None else None,
            text=None if info.texts is None else info.texts[row],
        )
        for row, (index, score) in enumerate(zip(indices.tolist(), scores.tolist()))
    )


def explain(
    model: nn.Module,
    loss_fn: LossFn,
    train: IndexedData,
    val: IndexedData,
    setup: ProblemConfig,
    settings: ExplainConfig,
    collectives: Collectives | None = None,
    describe: Describe = describe_batch,
    on_lissa_step: Callable[[], None] | None = None,
    on_scored: Callable[[int], None] | None = None,
    snapshots: Sequence[Snapshot] = (),
) -> Explanation:
    """Explain the monitored validation points of ``model`` by the training examples of ``train``.

    Runs in analysis mode (eval, RNG restored). ``on_lissa_step``/``on_scored`` feed progress bars. ``setup``
    poses the problem (solver, curvature, damping, ...); its ``weight_decay`` (the training L2 strength, when
    known) floors ``damping="auto"`` and informs the self-diagnosis (``settings.diagnose``). ``snapshots``:
    earlier weights of the same run; each gets its own s_test (at the damping the current weights resolved) and
    the scores are averaged over them and the current weights (:mod:`~lightning_influence.core.trajectory`).
    """
    collectives = collectives or SingleProcess()
    _warn_top_k(settings.top_k, len(train))
    problem = InfluenceProblem(model, loss_fn, train.loader(), setup)
    weight_decay = setup.weight_decay
    device = problem.device
    timings: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = step()
        timings[name] = time.perf_counter() - start
        return result

    with analysis_mode(model):
        chosen, losses, test_batch, gradients = timed(
            "select", lambda: _monitored_points(problem, loss_fn, val, settings, collectives, describe))
        candidates, note = None, None
        if settings.num_candidates is not None:  # or None and a note when scoring everything is cheaper
            candidates, note = timed("candidates", lambda: choose_candidates(problem, test_batch, gradients, train,
                                                                             settings, collectives, loss_fn))
        s_vectors, info, halves = timed("s_test", lambda: solve_s_test_with_halves(problem, gradients, collectives,
                                                                                   on_lissa_step))
        scorer, info = timed("snapshots", lambda: _with_snapshots(problem, info, loss_fn, train, setup, test_batch,
                                                                  snapshots, collectives)) if snapshots else (problem, info)
        top, kept_scores, score_shard = timed("scoring", lambda: _score(problem, scorer, train, s_vectors, candidates,
                                                                        settings, collectives, on_scored))
        trust = None
        if settings.diagnose:
            trust = timed("trust", lambda: _diagnose_safely(problem, train, chosen, gradients, s_vectors, halves, top,
                                                            info, weight_decay))
            if note is not None:
                trust = replace(trust, warnings=(*trust.warnings, TrustWarning("candidates_skipped", note, "info")))
        points = _explained_points(model, loss_fn, train, chosen, losses, test_batch, top, kept_scores, device, describe)
    # the configured settings, then what the solve itself recorded beside them (the route it took, its CG steps,
    # the snapshots' solves, the sampled verdict): the trace's TensorBoard tags follow the route
    configured = config_to_dict(setup.solver_config)
    recorded = {k: v for k, v in (info.settings or {}).items() if k not in configured}
    info = replace(info, settings={**configured, **recorded})
    return Explanation(tuple(points), info, timings, len(train), score_shard, trust)


def _warn_top_k(top_k: int, n_train: int) -> None:
    if top_k > n_train:
        warnings.warn(
            f"`top_k`={top_k} exceeds the training-set size ({n_train}): the harmful and the helpful"
            f" lists each hold all {n_train} training examples (every example appears in both). Lower `top_k`"
            f" to at most {max(n_train // 2, 1)} for disjoint lists.", UserWarning, stacklevel=3,
        )


def _monitored_points(
    problem: InfluenceProblem, loss_fn: LossFn, val: IndexedData, settings: ExplainConfig, collectives: Collectives,
    describe: Describe,
) -> tuple[list[int], torch.Tensor, Batch, torch.Tensor]:
    """The validation indices to explain, all validation losses, the points' batch and their loss gradients."""
    model, device = problem.model, problem.device
    before = state_snapshot(model)
    _, losses, predictions = validation_losses(model, loss_fn, val, device, collectives)
    check_state_unchanged(model, before)
    labels = None
    if settings.misclassified_only:
        labels = describe(model, prepare_batch(val.fetch(range(len(val))), device)).labels
    chosen = select_points(settings, val, losses, predictions, None if labels is None else labels.cpu())
    if not chosen:
        raise ValueError("No validation point to explain: with `misclassified_only=True` the model made no error.")
    test_batch = prepare_batch(val.fetch(chosen), device)
    return chosen, losses, test_batch, problem.gradients(test_batch)


def _with_snapshots(problem: InfluenceProblem, info: SolveInfo, loss_fn: LossFn, train: IndexedData,
                    setup: ProblemConfig, test_batch: Batch, snapshots: Sequence[Snapshot], collectives: Collectives
                    ) -> tuple[Scorer, SolveInfo]:
    """The scores averaged over ``snapshots`` and the current weights, and the solve record with their verdicts
    joined in (each snapshot solved at the damping the current weights resolved)."""
    members = solve_snapshots(problem.model, loss_fn, train.loader(), setup, problem.damping, test_batch, snapshots,
                              collectives)
    return AveragedScores(problem, problem.model, members), joined_verdict(info, members)


def _score(
    problem: InfluenceProblem, scorer: Scorer, train: IndexedData, s_vectors: torch.Tensor,
    candidates: Optional[Neighbours], settings: ExplainConfig, collectives: Collectives,
    on_scored: Callable[[int], None] | None,
) -> tuple[TopInfluences, torch.Tensor, Optional[ScoreShard]]:
    """Top lists, the kept scores (histogram sample or candidates' scores) and this rank's score shard."""
    if candidates is None:
        return score_training_set(scorer, train, s_vectors, settings, collectives, on_scored)
    # only each point's own candidates are scored and reported: the others are absent, not zero
    top, kept_scores = score_candidates(scorer, train, s_vectors, candidates, settings, collectives, on_scored)
    keep = settings.keep_full_scores and collectives.rank == 0
    return top, kept_scores, candidate_score_shard(kept_scores, candidates.indices) if keep else None


def _diagnose_safely(problem: InfluenceProblem, train: IndexedData, chosen: list[int], gradients: torch.Tensor,
                     s_vectors: torch.Tensor, halves: Any, top: TopInfluences, info: SolveInfo,
                     weight_decay: Optional[float]) -> TrustReport:
    """The self-diagnosis; if it fails, a report that says so (the diagnosis must not cost the analysis)."""
    try:
        return diagnose(problem, train, chosen, gradients, s_vectors, halves, top, info, weight_decay)
    except Exception as err:  # noqa: BLE001 - say why the diagnosis is missing instead of losing the analysis
        return TrustReport((), (TrustWarning(
            "diagnosis_failed", f"The self-diagnosis failed ({type(err).__name__}: {err}); the results above"
            " are unchecked. Pass `diagnose=False` to skip it."),))


def _explained_points(
    model: nn.Module, loss_fn: LossFn, train: IndexedData, chosen: list[int], losses: torch.Tensor, test_batch: Batch,
    top: TopInfluences, kept_scores: Optional[torch.Tensor], device: torch.device, describe: Describe,
) -> list[ExplainedPoint]:
    """One record per monitored point with its harmful and helpful training examples described."""
    test_info = describe(model, test_batch)
    images = test_info.inputs is not None and keeps_input(test_info.inputs[0])  # images and small inputs
    points = []
    for row, val_index in enumerate(chosen):
        harmful = _influencers(model, loss_fn, train, top.harmful_indices[row], top.harmful_scores[row], device, describe)
        helpful = _influencers(model, loss_fn, train, top.helpful_indices[row], top.helpful_scores[row], device, describe)
        points.append(ExplainedPoint(
            val_index=int(val_index),
            label=row_value(test_info.labels, row),
            prediction=row_value(test_info.predictions, row),
            loss=float(losses[val_index]),
            harmful=harmful,
            helpful=helpful,
            scores=kept_scores[row] if kept_scores is not None else None,
            input=test_info.inputs[row].detach().cpu() if images and test_info.inputs is not None else None,
            text=None if test_info.texts is None else test_info.texts[row],
        ))
    return points
