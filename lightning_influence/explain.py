"""Explain validation points by training examples: the analysis the callback runs, on every rank.

Data flows one way: validation losses -> monitored points -> s_test -> training scores (a shard per rank)
-> merged top-k -> report records. Lightning-free: ranks talk only through a :class:`Collectives`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_map

from lightning_influence.core.batching import Batch, batch_size_of, prepare_batch
from lightning_influence.core.candidates import (
    CandidateScoreCollector,
    FeatureFn,
    NearestNeighbours,
    Neighbours,
    batch_features,
    check_candidates,
    resolve_feature_fn,
    collect_candidate_scores,
    knn_faiss,
    merge_neighbours,
)
from lightning_influence.core.config import CGConfig, LissaConfig, SolveInfo, SolverConfig
from lightning_influence.core.data import IndexedData
from lightning_influence.core.losses import LossFn, check_per_example_losses
from lightning_influence.core.params import analysis_mode
from lightning_influence.core.problem import InfluenceProblem, lissa_info
from lightning_influence.core.scoring import StreamingTopK, TopInfluences, top_influences_of
from lightning_influence.distributed.collectives import Collectives, SingleProcess
from lightning_influence.reporting.images import looks_like_image
from lightning_influence.reporting.records import ExplainedPoint, Influencer, SolverSummary, TrustReport, TrustWarning
from lightning_influence.trust import diagnose

#: Influence scores kept per monitored point for its histogram (a regular subsample beyond this).
MAX_HISTOGRAM_SCORES = 100_000

Describe = Callable[[nn.Module, Batch], "Description"]
T = TypeVar("T")


@dataclass(frozen=True)
class Description:
    """What the tables and grids show for a batch: inputs, labels and model predictions (any may be None), and
    ``texts``: one string per example from an ``example_formatter`` (token ids decoded, a tabular row), if given."""

    inputs: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    predictions: Optional[torch.Tensor]
    texts: Optional[list[str]] = None


ExampleFormatter = Callable[[Any], str]


def describe_batch(model: nn.Module, batch: Batch, example_formatter: Optional[ExampleFormatter] = None) -> Description:
    """Inputs/labels from ``(input, target, ...)`` tuples or dicts with usual key names; predictions by argmax.

    ``example_formatter(example) -> str`` is called on each example of the batch (the batch's structure with every
    batched tensor indexed by the row, e.g. ``{"input_ids": Tensor[T], ...}``), e.g. a tokenizer's ``decode``.
    Bind it with ``functools.partial(describe_batch, example_formatter=...)`` to get a ``Describe``.
    """
    inputs = labels = None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        inputs = batch[0]
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    elif isinstance(batch, dict):
        inputs = next((batch[k] for k in ("input", "inputs", "x", "image", "images", "features") if k in batch), None)
        labels = next((batch[k] for k in ("label", "labels", "y", "target", "targets") if k in batch), None)
    predictions = None
    if isinstance(inputs, torch.Tensor):
        with torch.no_grad():
            out = model(inputs)
        if isinstance(out, torch.Tensor) and out.dim() == 2:
            predictions = out.argmax(dim=1) if out.shape[1] > 1 else out[:, 0]
    texts = None
    if example_formatter is not None:
        rows = range(batch_size_of(batch))
        texts = [str(example_formatter(tree_map(lambda t, i=i: t[i] if isinstance(t, torch.Tensor) and t.dim() > 0
                                                else t, batch))) for i in rows]
    return Description(inputs, labels, predictions, texts)


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain and how to score. ``val_indices`` overrides ``num_worst``."""

    top_k: int = 10
    num_worst: int = 8
    val_indices: Optional[tuple[int, ...]] = None
    misclassified_only: bool = False
    scoring: str = "auto"
    chunk_size: int = 256
    keep_full_scores: bool = False
    diagnose: bool = True  # self-diagnosis (residuals, repeat agreement, warnings): see lightning_influence.trust
    candidates: Optional[int] = None
    knn_backend: str = "torch"
    feature_fn: FeatureFn | str | None = None  # or "last_layer_grad" (see core.candidates)


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
    """The result; every rank gets the same one except ``score_shard`` (only rank 0 writes the rest)."""

    points: tuple[ExplainedPoint, ...]
    solver: SolverSummary
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


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Every ``world_size``-th index starting at ``rank``: disjoint shards that cover all, no padding."""
    return list(indices)[rank::world_size]


def gather_checked(
    collectives: Collectives, compute: Callable[[], T], share: Callable[[T], Any] = lambda value: value
) -> tuple[T, list[Any]]:
    """``compute()`` on this rank and every rank's ``share(result)`` in rank order; if any rank raised, all raise.

    A rank failing alone (a diverging LiSSA repeat, an out-of-memory error, a bad example in its shard) would
    leave the others blocked in the next collective until the process group's timeout, and the group broken
    afterwards. Each local step is therefore followed by this gather, which carries the failure to every rank.
    """
    error: Optional[BaseException] = None
    try:
        result: Any = compute()
        outcome: tuple[Any, Optional[str]] = (share(result), None)
    except Exception as err:  # noqa: BLE001 - re-raised below on this rank, reported on the others
        error, result = err, None
        outcome = (None, f"{type(err).__name__}: {err}")
    gathered = collectives.gather_objects(outcome)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (_, message) in enumerate(gathered) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"The influence analysis failed on rank {rank}, so every rank stops: {message}")
    return result, [value for value, _ in gathered]


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
    settings: ExplainSettings, val: IndexedData, losses: torch.Tensor, predictions: Optional[torch.Tensor],
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
        if len(set(settings.val_indices)) != len(settings.val_indices):
            raise ValueError(f"Expected `val_indices` to be free of duplicates, but got {list(settings.val_indices)}."
                             " List each validation index once.")
        return list(settings.val_indices)
    candidates = torch.ones_like(losses, dtype=torch.bool)
    if settings.misclassified_only and predictions is not None and labels is not None:
        candidates = predictions != labels
    ranked = torch.where(candidates, losses, torch.full_like(losses, -float("inf"))).argsort(descending=True, stable=True)
    count = min(settings.num_worst, int(candidates.sum()))
    return ranked[:count].tolist()


def solve_s_test(
    problem: InfluenceProblem, gradients: torch.Tensor, collectives: Collectives, on_step: Callable[[], None] | None
) -> tuple[torch.Tensor, SolveInfo]:
    """s_test, with the work split over ranks and combined by one sum (all-reduce).

    LiSSA: rank r runs repeats r, r+R, ...; the traces come back in repeat order whatever the split, so
    ``trace`` row i is repeat i. CG: rank r solves test points r, r+R, ... (each point's system is
    independent). ``exact``/``lowrank`` are solved whole on every rank (same data, same result).
    """
    vectors, info, _ = solve_s_test_with_halves(problem, gradients, collectives, on_step)
    return vectors, info


def solve_s_test_with_halves(
    problem: InfluenceProblem, gradients: torch.Tensor, collectives: Collectives, on_step: Callable[[], None] | None
) -> tuple[torch.Tensor, SolveInfo, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`solve_s_test`, plus the means of the even- and the odd-numbered LiSSA repeats (None for fewer than
    2 repeats or a deterministic solver), for the repeat-agreement diagnosis.

    Each rank sums its even and its odd repeats separately; the two sums travel stacked in one all-reduce.
    """
    config = problem.config
    if isinstance(config, CGConfig) and collectives.world_size > 1:
        return (*_solve_cg_split(problem, gradients, collectives, on_step), None)
    if not isinstance(config, LissaConfig):
        result = problem.solve(gradients, on_step)
        return result.vectors, result.info, None
    if config.repeats < collectives.world_size and collectives.rank == 0:
        warnings.warn(
            f"LiSSA repeats={config.repeats} < {collectives.world_size} processes: "
            f"{collectives.world_size - config.repeats} rank(s) idle during s_test. Set `repeats` to a multiple of"
            f" the number of processes (e.g. {collectives.world_size}): a lower-variance s_test in the same time.",
            stacklevel=3,
        )
    start = time.perf_counter()
    ids = list(range(collectives.rank, config.repeats, collectives.world_size))
    halves = [[i for i in ids if i % 2 == parity] for parity in (0, 1)]

    def run_halves() -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        sums: list[torch.Tensor] = []
        traces: list[tuple[int, torch.Tensor]] = []
        for half in halves:
            total, half_traces = problem.lissa_partial(gradients, half, on_step)
            sums.append(total)
            traces.extend(zip(half, half_traces))
        return torch.stack(sums), traces

    (partial, _), gathered = gather_checked(collectives, run_halves, lambda result: result[1])
    even_odd = collectives.sum(partial)
    vectors = (even_odd[0] + even_odd[1]) / config.repeats
    all_traces = [trace for _, trace in sorted((pair for pairs in gathered for pair in pairs), key=lambda p: p[0])]
    info = lissa_info(problem.damping, problem.lissa_scale(), all_traces, config)
    means = None
    if config.repeats >= 2:
        means = (even_odd[0] / len(range(0, config.repeats, 2)), even_odd[1] / len(range(1, config.repeats, 2)))
    return vectors, SolveInfo(**{**info.__dict__, "seconds": time.perf_counter() - start}), means


def _solve_cg_split(
    problem: InfluenceProblem, gradients: torch.Tensor, collectives: Collectives, on_step: Callable[[], None] | None
) -> tuple[torch.Tensor, SolveInfo]:
    """CG with the test points split over ranks; the combined trace is the worst residual at each step."""
    start = time.perf_counter()
    ids = list(range(collectives.rank, gradients.shape[0], collectives.world_size))
    result, gathered = gather_checked(
        collectives,
        lambda: problem.solve(gradients[ids], on_step) if ids else None,
        lambda r: None if r is None else (r.info.converged, r.info.iterations, r.info.trace[0]),
    )
    full = torch.zeros_like(gradients)
    if result is not None:
        full[ids] = result.vectors
    vectors = collectives.sum(full)
    parts = [g for g in gathered if g is not None]
    length = max(len(trace) for _, _, trace in parts)
    padded = [torch.cat([t, t[-1:].expand(length - len(t))]) if len(t) else torch.zeros(length) for _, _, t in parts]
    trace = torch.stack(padded).max(dim=0).values
    info = SolveInfo("cg", problem.damping, time.perf_counter() - start, all(c for c, _, _ in parts),
                     trace=trace[None], iterations=max(i for _, i, _ in parts))
    return vectors, info


def score_training_set(
    problem: InfluenceProblem, train: IndexedData, s_vectors: torch.Tensor, settings: ExplainSettings,
    collectives: Collectives, on_chunk: Callable[[int], None] | None, indices: Sequence[int] | None = None,
) -> tuple[TopInfluences, torch.Tensor, Optional[ScoreShard]]:
    """Top-k over this rank's shard merged across ranks, a gathered histogram sample of the scores (every
    ``step``-th training index, in index order) and, if asked, this rank's full scores (not gathered).

    ``indices`` restricts scoring to those training indices (default: all).
    """
    local_indices = shard(range(len(train)) if indices is None else indices, collectives.rank, collectives.world_size)
    step = max(1, -(-len(train) // MAX_HISTOGRAM_SCORES))
    full: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score_shard() -> tuple[TopInfluences, torch.Tensor, torch.Tensor]:
        top = StreamingTopK(s_vectors.shape[0], settings.top_k)
        empty = (s_vectors.new_empty((s_vectors.shape[0], 0), device="cpu"), torch.empty(0, dtype=torch.long))
        sampled, full[:] = [empty], [empty]  # a shard may be empty
        for indices, batch in train.batches_with_indices(local_indices):
            position = 0
            for block in problem.scores(s_vectors, [batch], settings.scoring, settings.chunk_size):
                block_indices = indices[position : position + block.shape[1]]
                position += block.shape[1]
                top.update(block, block_indices)
                block = block.cpu()
                keep = block_indices % step == 0
                sampled.append((block[:, keep], block_indices[keep]))
                if settings.keep_full_scores:
                    full.append((block, block_indices))
                if on_chunk is not None:
                    on_chunk(block.shape[1])
        return top.result(), torch.cat([b for b, _ in sampled], 1), torch.cat([i for _, i in sampled])

    _, gathered = gather_checked(collectives, score_shard)
    sample = torch.cat([g[1] for g in gathered], dim=1)
    sample_indices = torch.cat([g[2] for g in gathered])
    sample = sample[:, sample_indices.argsort()]
    merged = merge_top_influences([g[0] for g in gathered], settings.top_k)
    local = None
    if settings.keep_full_scores:
        local = ScoreShard(torch.cat([i for _, i in full]), torch.cat([b for b, _ in full], 1),
                           collectives.rank, collectives.world_size)
    return merged, sample, local


def block_shard(n: int, block: int, rank: int, world_size: int) -> list[int]:
    """Indices of the fixed blocks ``[b * block, (b + 1) * block)`` with ``b = rank (mod world_size)``.

    Every example lands in the same block whatever the world size, so batch-dependent float results (features
    of a batch) are identical on any number of ranks.
    """
    return [i for start in range(rank * block, n, world_size * block) for i in range(start, min(start + block, n))]


def find_candidates(
    model: nn.Module, test_batch: Batch, train: IndexedData, settings: ExplainSettings, collectives: Collectives,
    device: torch.device, loss_fn: Optional[LossFn] = None,
) -> Neighbours:
    """Each test point's ``settings.candidates`` nearest training examples in feature space, the same on every
    rank and for every world size: features in fixed blocks (split over ranks), local exact kNN, one merge.
    ``loss_fn`` is needed for ``feature_fn="last_layer_grad"`` only."""
    k = check_candidates(settings.candidates, len(train))  # type: ignore[arg-type]
    feature_fn = resolve_feature_fn(settings.feature_fn, settings.knn_backend)
    queries = batch_features(model, test_batch, feature_fn, device, loss_fn)
    local = block_shard(len(train), train.batch_size, collectives.rank, collectives.world_size)

    def search() -> Neighbours:
        if settings.knn_backend == "torch":
            nearest = NearestNeighbours(queries, k)
            for indices, batch in train.batches_with_indices(local):
                nearest.update(batch_features(model, batch, feature_fn, device, loss_fn), indices)
            return nearest.result()
        pairs = [(i, batch_features(model, b, feature_fn, device).cpu())
                 for i, b in train.batches_with_indices(local)]
        if not pairs:
            return Neighbours(torch.empty(len(queries), 0, dtype=torch.long), torch.empty(len(queries), 0))
        keys, indices = torch.cat([f for _, f in pairs]), torch.cat([i for i, _ in pairs])
        found = knn_faiss(queries, keys, min(k, len(keys)))
        return Neighbours(indices[found.indices], found.distances)

    _, parts = gather_checked(collectives, search)
    return merge_neighbours(parts, k)


def score_candidates(
    problem: InfluenceProblem, train: IndexedData, s_vectors: torch.Tensor, candidates: Neighbours,
    settings: ExplainSettings, collectives: Collectives, on_chunk: Callable[[int], None] | None,
) -> tuple[TopInfluences, torch.Tensor]:
    """Scores of each point's own candidates ``[q, k]``: the union is sharded over ranks, scored once, merged."""
    collector = CandidateScoreCollector(candidates.indices, s_vectors.dtype)
    local = shard(collector.union(), collectives.rank, collectives.world_size)

    def score_shard() -> torch.Tensor:
        collect_candidate_scores(problem, train, s_vectors, collector, local, settings.scoring, settings.chunk_size,
                                 on_chunk)
        return collector.scores

    _, parts = gather_checked(collectives, score_shard)
    scores = CandidateScoreCollector.combine(parts)
    return top_influences_of(scores, candidates.indices, settings.top_k), scores


def candidate_score_shard(scores: torch.Tensor, indices: torch.Tensor) -> ScoreShard:
    """The candidates' scores ``[q, k]`` (training indices ``indices [q, k]``) as one shard over their union,
    NaN where an example is not a candidate of that point (absent, not zero). Small: rank 0 writes it alone."""
    union = indices.unique()
    table = scores.new_full((scores.shape[0], len(union)), float("nan"))
    table.scatter_(1, torch.searchsorted(union, indices), scores)
    return ScoreShard(union, table, rank=0, world_size=1)


def merge_top_influences(tops: Sequence[TopInfluences], k: int) -> TopInfluences:
    """The top-k of disjoint shards from their own top-k lists: harmful among harmful, helpful among helpful.

    Merged separately, no example is listed twice: in a shard of fewer than 2k examples an example can be in
    both of that shard's lists.
    """
    harmful = top_influences_of(torch.cat([t.harmful_scores for t in tops], 1),
                                torch.cat([t.harmful_indices for t in tops], 1), k)
    helpful = top_influences_of(torch.cat([t.helpful_scores for t in tops], 1),
                                torch.cat([t.helpful_indices for t in tops], 1), k)
    return TopInfluences(harmful.harmful_indices, harmful.harmful_scores, helpful.helpful_indices, helpful.helpful_scores)


def _influencers(
    model: nn.Module, loss_fn: LossFn, train: IndexedData, indices: torch.Tensor, scores: torch.Tensor,
    device: torch.device, describe: Describe,
) -> tuple[Influencer, ...]:
    batch = prepare_batch(train.fetch(indices.tolist()), device)
    with torch.no_grad():
        losses = loss_fn(model, batch).detach().cpu()
    info = describe(model, batch)
    images = info.inputs is not None and looks_like_image(info.inputs[0])
    return tuple(
        Influencer(
            train_index=int(index),
            influence=float(score),
            label=_item(info.labels, row),
            prediction=_item(info.predictions, row),
            loss=float(losses[row]),
            input=info.inputs[row].detach().cpu() if images else None,
        )
        for row, (index, score) in enumerate(zip(indices.tolist(), scores.tolist()))
    )


def _item(values: Optional[torch.Tensor], row: int) -> Any:
    if values is None:
        return None
    value = values[row]
    return value.item() if value.numel() == 1 else value.tolist()


def explain(
    model: nn.Module,
    loss_fn: LossFn,
    train: IndexedData,
    val: IndexedData,
    config: SolverConfig,
    damping: float,
    settings: ExplainSettings,
    collectives: Collectives | None = None,
    describe: Describe = describe_batch,
    on_lissa_step: Callable[[], None] | None = None,
    on_scored: Callable[[int], None] | None = None,
    weight_decay: Optional[float] = None,
) -> Explanation:
    """Explain the monitored validation points of ``model`` by the training examples of ``train``.

    Runs in analysis mode (eval, RNG restored). ``on_lissa_step``/``on_scored`` feed progress bars.
    ``weight_decay`` (the training L2 strength, when known) informs the self-diagnosis (``settings.diagnose``).
    """
    collectives = collectives or SingleProcess()
    if settings.top_k > len(train):
        warnings.warn(
            f"`top_k`={settings.top_k} exceeds the training-set size ({len(train)}): the harmful and the helpful"
            f" lists each hold all {len(train)} training examples (every example appears in both). Lower `top_k`"
            f" to at most {max(len(train) // 2, 1)} for disjoint lists.", UserWarning, stacklevel=2,
        )
    problem = InfluenceProblem(model, loss_fn, train.loader(), damping, config)
    device = problem.device
    timings: dict[str, float] = {}
    with analysis_mode(model):
        start = time.perf_counter()
        before = state_snapshot(model)
        _, losses, predictions = validation_losses(model, loss_fn, val, device, collectives)
        check_state_unchanged(model, before)
        labels = describe(model, prepare_batch(val.fetch(range(len(val))), device)).labels if settings.misclassified_only else None
        chosen = select_points(settings, val, losses, predictions, None if labels is None else labels.cpu())
        if not chosen:
            raise ValueError("No validation point to explain: with `misclassified_only=True` the model made no error.")
        test_batch = prepare_batch(val.fetch(chosen), device)
        gradients = problem.gradients(test_batch)
        timings["select"] = time.perf_counter() - start

        candidates = None
        if settings.candidates is not None:
            start = time.perf_counter()
            candidates = find_candidates(model, test_batch, train, settings, collectives, device, loss_fn)
            timings["candidates"] = time.perf_counter() - start

        start = time.perf_counter()
        s_vectors, info, halves = solve_s_test_with_halves(problem, gradients, collectives, on_lissa_step)
        timings["s_test"] = time.perf_counter() - start

        start = time.perf_counter()
        if candidates is None:
            top, kept_scores, score_shard = score_training_set(problem, train, s_vectors, settings, collectives,
                                                               on_scored)
        else:  # only each point's own candidates are scored and reported: the others are absent, not zero
            top, kept_scores = score_candidates(problem, train, s_vectors, candidates, settings, collectives, on_scored)
            score_shard = candidate_score_shard(kept_scores, candidates.indices) if (
                settings.keep_full_scores and collectives.rank == 0) else None
        timings["scoring"] = time.perf_counter() - start

        trust = None
        if settings.diagnose:
            start = time.perf_counter()
            try:
                trust = diagnose(problem, train, chosen, gradients, s_vectors, halves, top, info, weight_decay)
            except Exception as err:  # noqa: BLE001 - the diagnosis must not cost the analysis; say why it is missing
                trust = TrustReport((), (TrustWarning(
                    "diagnosis_failed", f"The self-diagnosis failed ({type(err).__name__}: {err}); the results above"
                    " are unchecked. Pass `diagnose=False` to skip it."),))
            timings["trust"] = time.perf_counter() - start

        test_info = describe(model, test_batch)
        images = test_info.inputs is not None and looks_like_image(test_info.inputs[0])
        points = []
        for row, val_index in enumerate(chosen):
            harmful = _influencers(model, loss_fn, train, top.harmful_indices[row], top.harmful_scores[row], device, describe)
            helpful = _influencers(model, loss_fn, train, top.helpful_indices[row], top.helpful_scores[row], device, describe)
            points.append(
                ExplainedPoint(
                    val_index=int(val_index),
                    label=_item(test_info.labels, row),
                    prediction=_item(test_info.predictions, row),
                    loss=float(losses[val_index]),
                    harmful=harmful,
                    helpful=helpful,
                    scores=kept_scores[row] if kept_scores is not None else None,
                    input=test_info.inputs[row].detach().cpu() if images else None,
                )
            )
    summary = SolverSummary(
        solver=info.solver,
        damping=info.damping,
        converged=info.converged,
        seconds=info.seconds,
        scale=info.scale,
        settings={k: v for k, v in config.__dict__.items()},
        trace=info.trace,
    )
    return Explanation(tuple(points), summary, timings, len(train), score_shard, trust)


def call_loss_fn(loss_fn: LossFn, model: nn.Module, batch: Batch) -> Any:
    """``loss_fn(model, batch)``; a failure to read the batch says what the batch looks like and what to do."""
    try:
        return loss_fn(model, batch)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise TypeError(
            f"`loss_fn` failed on a batch of the validation data ({_batch_structure(batch)}) with"
            f" {type(err).__name__}: {err}. The loss function must accept the batches your DataLoader yields: pass"
            " `loss_fn=lambda module, batch: ...` (or define `per_example_loss(batch)`) that unpacks them, returning"
            " one loss per example."
        ) from err


def _batch_structure(batch: Batch) -> str:
    if isinstance(batch, dict):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    if isinstance(batch, torch.Tensor):
        return f"a Tensor of shape {list(batch.shape)}"
    return f"a {type(batch).__name__}"


def check_finite_losses(losses: Any, indices: torch.Tensor, split: str) -> torch.Tensor:
    """Per-example losses of the right shape and all finite; else an error naming the dataset indices."""
    losses = check_per_example_losses(losses, len(indices))
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        where = indices[bad.cpu()][:10].tolist()
        raise ValueError(
            f"Expected finite per-example losses, but the {split} examples {where} have loss"
            f" {losses.detach()[bad][:10].tolist()}. Influence needs finite losses and gradients: check those examples"
            " (NaN inputs, labels out of range) and the model (diverged weights), e.g. `torch.isfinite(loss)`."
        )
    return losses


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, to check that a forward pass in eval mode changes nothing."""
    state = {f"parameter {n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def check_state_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Raise when the model's forward (in eval mode) changed a parameter or buffer.

    Influence differentiates one fixed function of the parameters; a forward that updates state (a call
    counter, BatchNorm kept in training mode, an EMA updated in ``forward``) makes every pass a different one.
    """
    after = state_snapshot(model)
    changed = [name for name, value in before.items()
               if name not in after or after[name].shape != value.shape or not torch.equal(after[name], value)]
    if changed:
        raise ValueError(
            f"Expected the model's forward to leave its state unchanged in eval mode, but it changed {changed[:5]}."
            " Influence needs a fixed function of the parameters: update such state only under `if self.training:`"
            " (and keep BatchNorm layers in eval mode: do not call `.train()` inside `forward`)."
        )
