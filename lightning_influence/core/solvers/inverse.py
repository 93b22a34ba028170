"""Deterministic inverse-HVP solvers: the exact eigendecomposition reference and conjugate gradient."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_influence.config import CGConfig

MatVec = Callable[[torch.Tensor], torch.Tensor]


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
