"""The low-rank solver: the top eigenpairs of the curvature by Lanczos, damping alone on the other directions."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from lightning_influence.config import LowRankConfig
from lightning_influence.core.curvature.products import dataset_product
from lightning_influence.core.solvers.base import ONE_PROCESS, OnStep, Ranks, Solver
from lightning_influence.core.tensors.eigen import lanczos
from lightning_influence.results import STest


@dataclass(frozen=True)
class LowRankInverse:
    """``(H + damping I)^-1`` from the top eigenpairs of H (Lanczos), damping alone on the rest of the space.

    ``A^-1 v ~= Q diag(1/(w + damping)) Q^T v + (v - Q Q^T v) / damping``; with ``residual=False`` the second term
    is dropped (the inverse restricted to the top eigenspace).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    damping: float
    residual: bool = True

    def _coords(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.eigenvectors.to(vectors)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        coords = self._coords(vectors)
        inverse = (1.0 / (self.eigenvalues + self.damping)).to(vectors)
        out = (coords * inverse) @ self.eigenvectors.T.to(vectors)
        if self.residual and self.damping > 0:
            out = out + (vectors - coords @ self.eigenvectors.T.to(vectors)) / self.damping
        return out

    def quadratic_forms(self, vectors: torch.Tensor) -> torch.Tensor:
        """``g^T (H + damping I)^-1 g`` per row: one projection onto the top eigenvectors, no solve."""
        coords = self._coords(vectors).double()
        inside = coords.square()
        total = (inside / (self.eigenvalues + self.damping)).sum(dim=1)
        if self.residual and self.damping > 0:
            rest = (vectors.double().square().sum(dim=1) - inside.sum(dim=1)).clamp_min(0.0)
            total = total + rest / self.damping
        return total.to(vectors.dtype)


class LowRankSolver(Solver):
    """:class:`LowRankInverse` from ``config.steps`` Lanczos steps on curvature products over a fixed seeded subset
    of ``config.hvp_examples`` training examples (cached); the same on every rank."""

    name: ClassVar[str] = "lowrank"
    factorised: ClassVar[bool] = True
    config: LowRankConfig

    def __init__(self, config: LowRankConfig, problem: Any) -> None:
        super().__init__(config, problem)
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def inverse(self) -> LowRankInverse:
        config, problem = self.config, self.problem
        if self._pairs is None:
            batches = list(problem.training_subset(config.hvp_examples, config.seed))
            like = next(iter(problem.params.values()))
            generator = torch.Generator().manual_seed(config.seed)
            values, vectors = lanczos(lambda v: dataset_product(problem.minibatch_hvp, batches, v),
                                      problem.num_params, config.steps, generator=generator, like=like,
                                      top=config.rank)  # only the kept pairs' vectors are formed
            keep = values.argsort(descending=True)[: config.rank]
            self._pairs = (values[keep], vectors[:, keep])
        return LowRankInverse(*self._pairs, problem.damping, config.residual)

    def quadratic_forms(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.inverse().quadratic_forms(vectors)

    def solve(self, vectors: torch.Tensor, on_step: OnStep | None = None, ranks: Ranks = ONE_PROCESS) -> STest:
        start = time.perf_counter()
        low_rank = self.inverse()
        x = low_rank.solve(vectors)
        info = self.problem.solve_info("lowrank", True, x, vectors, iterations=self.config.steps,
                                       eigenvalue_min=float(low_rank.eigenvalues.min()),
                                       eigenvalue_max=float(low_rank.eigenvalues.max()))
        return STest(x, replace(info, seconds=time.perf_counter() - start))
