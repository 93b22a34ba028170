"""Extreme eigenvalues of symmetric operators given only matrix-vector products."""

from __future__ import annotations

from collections.abc import Callable

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def top_eigenvalue(
    matvec: MatVec, dim: int, *, iters: int = 20, generator: torch.Generator | None = None, like: torch.Tensor
) -> float:
    """Largest-magnitude eigenvalue of a symmetric operator by power iteration (a lower bound on ``|lambda|``).

    Args:
        matvec: ``[1, P] -> [1, P]`` product with the operator.
        dim: P.
        iters: power-iteration steps.
        generator: seeds the start vector.
        like: a tensor giving dtype and device.
    """
    v = torch.randn(1, dim, generator=generator, dtype=torch.float64).to(like)
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iters):
        w = matvec(v)
        estimate = float((w * v).sum())
        norm = w.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        v = w / norm
    return abs(estimate)


def lanczos(
    matvec: MatVec, dim: int, steps: int, *, generator: torch.Generator | None = None, like: torch.Tensor,
    with_vectors: bool = True, top: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs of a symmetric operator from ``steps`` Lanczos iterations with full reorthogonalisation.

    Args:
        matvec: ``[1, P] -> [1, P]`` product with the operator.
        dim: P.
        steps: Krylov dimension m (at most P); the extreme eigenvalues converge first.
        generator: seeds the start vector.
        like: a tensor giving dtype and device of the basis.
        with_vectors: form the Ritz vectors (``[P, m']``: as large as the basis); False returns an empty
            ``[P, 0]`` in their place, for callers that need the eigenvalues only.
        top: only the ``top`` largest Ritz pairs (their ``[P, top]`` vectors are formed alone: no ``[P, m']``
            temporary beside the basis).

    Returns:
        ``(eigenvalues [m'], eigenvectors [P, m'])`` ascending, with ``m' <= steps`` (fewer if the Krylov
        space is exhausted). Eigenvalues are computed in float64; vectors keep ``like``'s dtype.
    """
    steps = min(steps, dim)
    basis = torch.zeros(steps, dim, dtype=like.dtype, device=like.device)
    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(like)
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = matvec(basis[j][None])[0]
        alphas.append(float(w @ basis[j]))
        for _ in range(2):  # classical Gram-Schmidt twice against the whole basis: numerically orthogonal
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        if j + 1 == steps or beta < 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    m = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    if top is not None:
        values, vectors = values[-top:], vectors[:, -top:]
    if not with_vectors:
        return values, basis.new_empty(dim, 0)
    return values, basis[:m].T @ vectors.to(basis)
