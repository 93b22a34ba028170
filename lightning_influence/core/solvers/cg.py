"""Conjugate gradient on full-data curvature products, optionally preconditioned by K-FAC/EK-FAC; the test points
split over ranks (each point's system is independent)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

import torch

from lightning_influence.config import RESIDUAL_TOL, CGConfig
from lightning_influence.core.curvature.preconditioner import KroneckerPreconditioner, Reduce
from lightning_influence.core.solvers.base import ONE_PROCESS, OnStep, Ranks, Solver
from lightning_influence.results import STest

MatVec = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(
    matvec: MatVec, vectors: torch.Tensor, config: CGConfig, preconditioner: MatVec | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """Solve ``A x = v`` for every row of ``vectors`` at once (A symmetric positive definite).

    ``preconditioner`` applies ``M^-1`` (symmetric positive definite, ``M ~= A``) to rows: preconditioned CG.
    A row stops moving once its relative residual ``||v - A x|| / ||v||`` is below ``config.tol``. Returns the
    solutions, the trace of the largest relative residual per iteration, whether all rows converged below
    ``config.tol``, and the iterations used.
    """
    tiny = torch.finfo(vectors.dtype).tiny
    b_norm = vectors.norm(dim=1).clamp_min(tiny)
    x = torch.zeros_like(vectors)
    r = vectors.clone()
    z = preconditioner(r) if preconditioner is not None else r
    p = z.clone()
    rz = (r * z).sum(dim=1)
    active = torch.ones(len(vectors), dtype=torch.bool, device=vectors.device)
    trace = []
    for iteration in range(1, config.max_iter + 1):
        ap = matvec(p)
        curvature = (p * ap).sum(dim=1)
        if bool((curvature[active] <= 0).any()):
            raise ValueError(
                "Expected H + damping I to be positive definite for conjugate gradient, but found a direction of"
                " non-positive curvature. Increase `damping` (e.g. 10x) or use solver='lissa'."
            )
        alpha = torch.where(active, rz / curvature.where(active, torch.ones_like(curvature)), torch.zeros_like(rz))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        relative = r.norm(dim=1) / b_norm
        trace.append(float(relative.max()))
        active = relative >= config.tol
        if not bool(active.any()):
            return x, torch.tensor(trace), True, iteration
        z = preconditioner(r) if preconditioner is not None else r
        rz_next = (r * z).sum(dim=1)
        beta = torch.where(active, rz_next / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = torch.where(active[:, None], z + beta[:, None] * p, torch.zeros_like(p))
        rz = rz_next
    return x, torch.tensor(trace), False, config.max_iter


class CGSolver(Solver):
    """(Preconditioned) conjugate gradient (``config`` a :class:`~lightning_influence.config.CGConfig`); rank r
    solves the points r, r + R, ...; the combined trace is the worst residual at each step."""

    name: ClassVar[str] = "cg"
    split: ClassVar[str] = "points"
    stores_jacobian: ClassVar[bool] = True
    config: CGConfig

    def preconditioner(self, reduce: Reduce | None = None, shard: tuple[int, int] = (0, 1)) -> KroneckerPreconditioner:
        """The preconditioner of ``config.preconditioner`` (see :meth:`Solver.kronecker`)."""
        assert self.config.preconditioner is not None  # noqa: S101 - only called when a preconditioner is configured
        return self.kronecker(self.config.preconditioner, reduce, shard)

    def prepare(self, ranks: Ranks = ONE_PROCESS) -> None:
        if self.config.preconditioner is not None:  # the factors: each rank a share, summed
            self.preconditioner(ranks.sum if ranks.world_size > 1 else None, (ranks.rank, ranks.world_size))

    def _run(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
        precondition = None
        if self.config.preconditioner is not None:
            kronecker, damping = self.preconditioner(), self.problem.damping
            precondition = lambda r: kronecker.apply(r, damping)  # noqa: E731
        return conjugate_gradient(self.problem.damped_hvp, vectors, self.config, precondition)

    def solve(self, vectors: torch.Tensor, on_step: OnStep | None = None, ranks: Ranks = ONE_PROCESS) -> STest:
        start = time.perf_counter()
        self.prepare(ranks)
        if ranks.world_size == 1:
            x, trace, converged, iterations = self._run(vectors)
        else:
            x, trace, converged, iterations = self._split(vectors, ranks)
        info = self.problem.solve_info("cg", converged or float(trace[-1]) <= RESIDUAL_TOL, x, vectors,
                                       trace=trace[None], iterations=iterations,
                                       settings={"preconditioner": self.config.preconditioner})
        return STest(x, replace(info, seconds=time.perf_counter() - start))

    def _split(self, vectors: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
        ids = list(range(ranks.rank, vectors.shape[0], ranks.world_size))
        result, gathered = ranks.gather(lambda: self._run(vectors[ids]) if ids else None,
                                        lambda r: None if r is None else (r[2], r[3], r[1]))
        full = torch.zeros_like(vectors)
        if result is not None:
            full[ids] = result[0]
        x = ranks.sum(full)
        parts: list[Any] = [g for g in gathered if g is not None]
        length = max(len(trace) for _, _, trace in parts)
        padded = [torch.cat([t, t[-1:].expand(length - len(t))]) if len(t) else torch.zeros(length)
                  for _, _, t in parts]
        trace = torch.stack(padded).max(dim=0).values
        return x, trace, all(c for c, _, _ in parts), max(i for _, i, _ in parts)
