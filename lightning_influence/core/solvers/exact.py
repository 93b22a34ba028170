"""The exact solver: the dense curvature (float64) and its eigendecomposition, the reference for small models."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from lightning_influence.config import ExactConfig
from lightning_influence.core.solvers.base import ONE_PROCESS, OnStep, Ranks, Solver
from lightning_influence.results import STest


@dataclass(frozen=True)
class ExactInverse:
    """``(H + damping I)^-1`` from the eigendecomposition ``H = Q diag(w) Q^T`` (float64)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    damping: float

    @classmethod
    def from_hessian(cls, hessian: torch.Tensor, damping: float) -> ExactInverse:
        w, q = torch.linalg.eigh(hessian.double())
        inverse = cls(w, q, damping)
        if float(w[0]) + damping <= 0:
            warnings.warn(
                f"damping={damping:.3g} is below |lambda_min|={-float(w[0]):.3g} of the Hessian: H + damping I is not"
                " positive definite, so influence along negative-curvature directions flips sign. Increase"
                f" `damping` above {-float(w[0]):.3g}.",
                stacklevel=3,
            )
        return inverse

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """Rows of ``vectors`` times ``(H + damping I)^-1``, in the input's dtype."""
        coords = vectors.double() @ self.eigenvectors
        return ((coords / (self.eigenvalues + self.damping)) @ self.eigenvectors.T).to(vectors.dtype)

    def quadratic_forms(self, vectors: torch.Tensor) -> torch.Tensor:
        """``g^T (H + damping I)^-1 g`` for each row g of ``vectors``."""
        coords = vectors.double() @ self.eigenvectors
        return (coords.square() / (self.eigenvalues + self.damping)).sum(dim=1).to(vectors.dtype)


class ExactSolver(Solver):
    """``(C + damping I)^-1`` from the eigendecomposition of the dense curvature over the whole training set
    (at most ``config.max_parameters`` parameters); the same on every rank."""

    name: ClassVar[str] = "exact"
    factorised: ClassVar[bool] = True
    config: ExactConfig

    def __init__(self, config: ExactConfig, problem: Any) -> None:
        super().__init__(config, problem)
        self._inverse: ExactInverse | None = None

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.problem.curvature_eigh(self.config.max_parameters)

    def inverse(self) -> ExactInverse:
        if self._inverse is None or self._inverse.damping != self.problem.damping:
            w, q = self.eigh()
            self._inverse = ExactInverse(w, q, self.problem.damping)
        return self._inverse

    def exact_spectrum(self) -> tuple[float, float]:
        w, _ = self.eigh()
        return float(w[0]), float(w[-1])

    def quadratic_forms(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.inverse().quadratic_forms(vectors)

    def solve(self, vectors: torch.Tensor, on_step: OnStep | None = None, ranks: Ranks = ONE_PROCESS) -> STest:
        start = time.perf_counter()
        inverse = self.inverse()
        w = inverse.eigenvalues
        x = inverse.solve(vectors)
        info = self.problem.solve_info("exact", float(w[0]) + self.problem.damping > 0, x, vectors,
                                       use_residual=False, eigenvalue_min=float(w[0]), eigenvalue_max=float(w[-1]))
        return STest(x, replace(info, seconds=time.perf_counter() - start))
