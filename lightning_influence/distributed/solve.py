"""Distributed s_test: the solver's work split over ranks and combined by one all-reduce.

LiSSA: rank r runs repeats r, r+R, ... (FastIF's scheme); CG: rank r solves test points r, r+R, ...;
``exact`` and ``lowrank`` are solved whole on every rank. With :class:`SingleProcess` collectives this is
the single-process solve the functional API uses, so one code path serves one process and many.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Optional

import torch

from lightning_influence.config import RESIDUAL_TOL, CGConfig, LissaConfig
from lightning_influence.core.problem import InfluenceProblem
from lightning_influence.core.solvers.neumann import LissaDivergenceError
from lightning_influence.core.solvers.recovery import divergence_error, recover_from_divergence
from lightning_influence.distributed.collectives import Collectives
from lightning_influence.distributed.sharding import gather_checked
from lightning_influence.results import SolveInfo


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
    if isinstance(config, CGConfig) and config.preconditioner is not None:  # factors: each rank a share, summed
        problem.preconditioner(collectives.sum, (collectives.rank, collectives.world_size))
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
    if config.scale == "auto" and collectives.world_size > 1 and not problem.has_lissa_scale:
        # split the scale estimate's probe batches over ranks too; the max of the parts is the 1-process value
        _, parts = gather_checked(collectives, lambda: problem.estimate_lissa_scale(collectives.rank,
                                                                                    collectives.world_size))
        problem.set_lissa_scale(max(parts))
    ids = list(range(collectives.rank, config.repeats, collectives.world_size))
    halves = [[i for i in ids if i % 2 == parity] for parity in (0, 1)]
    retries: list[dict[str, Any]] = []
    while True:
        outcome, gathered = gather_checked(collectives, lambda: _run_halves(problem, gradients, halves, on_step,
                                                                            can_retry=len(retries) < config.max_retries,
                                                                            runs_all=len(ids) == config.repeats),
                                           lambda result: (result[0], result[1], result[3]))
        diverged = [shared for shared in gathered if shared[0] == "diverged"]
        if not diverged:
            break
        if len(retries) >= config.max_retries:
            if outcome[0] == "diverged":
                raise divergence_error(problem, outcome[2], retries) from outcome[2]
            raise RuntimeError(f"LiSSA diverged on another rank after {len(retries)} retries: {diverged[0][1]}")
        record = diverged[0][1]  # every rank adopts the first diverging rank's recovery: the same state everywhere
        problem.apply_recovery(record)
        retries.append(record)
    even_odd = collectives.sum(outcome[2])
    vectors = (even_odd[0] + even_odd[1]) / config.repeats
    all_traces = [trace for _, trace in sorted((pair for shared in gathered for pair in shared[1]), key=lambda p: p[0])]
    known = [shared[2] for shared in gathered if shared[2] is not None]
    residual = known[0] if known else _split_residual(problem, vectors, gradients, collectives)
    info = problem.lissa_solve_info(all_traces, vectors, gradients, retries, residual)
    means = None
    if config.repeats >= 2:
        means = (even_odd[0] / len(range(0, config.repeats, 2)), even_odd[1] / len(range(1, config.repeats, 2)))
    return vectors, replace(info, seconds=time.perf_counter() - start), means


def _split_residual(problem: InfluenceProblem, vectors: torch.Tensor, gradients: torch.Tensor,
                    collectives: Collectives) -> float:
    """The residual check of the combined solution, its curvature product split over ranks like the repeats."""
    (total, count), _ = gather_checked(collectives, lambda: problem.check_product(
        vectors, (collectives.rank, collectives.world_size)), lambda _: None)
    combined = collectives.sum(torch.cat([total.flatten(), total.new_tensor([count])]))
    product = (combined[:-1].reshape(vectors.shape), int(round(float(combined[-1]))))
    return float(problem.residual(vectors, gradients, product).max())


def _run_halves(problem: InfluenceProblem, gradients: torch.Tensor, halves: list[list[int]],
                on_step: Callable[[], None] | None, can_retry: bool, runs_all: bool) -> tuple[Any, ...]:
    """This rank's sums of its even and odd repeats and their traces: ``("ok", traces, sums, residual)``, where
    ``residual`` is the known residual of the whole solution when this rank ran every repeat (else None); after a
    divergence ``("diverged", recovery record or message, error, None)`` (the record when a retry is left)."""
    sums: list[torch.Tensor] = []
    traces: list[tuple[int, torch.Tensor]] = []
    try:
        for half in halves:
            total, half_traces = problem.lissa_partial(gradients, half, on_step)
            sums.append(total)
            traces.extend(zip(half, half_traces))
    except LissaDivergenceError as error:
        return "diverged", recover_from_divergence(problem, error) if can_retry else str(error), error, None
    known = problem.known_residual(torch.stack(sums).sum(dim=0) / len(traces), gradients) if runs_all and traces else None
    return "ok", traces, torch.stack(sums), None if known is None else float(known.max())


def _solve_cg_split(
    problem: InfluenceProblem, gradients: torch.Tensor, collectives: Collectives, on_step: Callable[[], None] | None
) -> tuple[torch.Tensor, SolveInfo]:
    """CG with the test points split over ranks; the combined trace is the worst residual at each step."""
    config = problem.config
    assert isinstance(config, CGConfig)
    start = time.perf_counter()
    ids = list(range(collectives.rank, gradients.shape[0], collectives.world_size))
    result, gathered = gather_checked(
        collectives,
        lambda: problem.solve(gradients[ids], on_step) if ids else None,
        lambda r: None if r is None or r.info.trace is None else (r.info.converged, r.info.iterations, r.info.trace[0]),
    )
    full = torch.zeros_like(gradients)
    if result is not None:
        full[ids] = result.vectors
    vectors = collectives.sum(full)
    parts = [g for g in gathered if g is not None]
    length = max(len(trace) for _, _, trace in parts)
    padded = [torch.cat([t, t[-1:].expand(length - len(t))]) if len(t) else torch.zeros(length) for _, _, t in parts]
    trace = torch.stack(padded).max(dim=0).values
    converged = all(c for c, _, _ in parts) or float(trace[-1]) <= RESIDUAL_TOL
    info = problem.solve_info("cg", converged, vectors, gradients, trace=trace[None],
                              iterations=max(i for _, i, _ in parts), settings={"preconditioner": config.preconditioner})
    return vectors, replace(info, seconds=time.perf_counter() - start)
