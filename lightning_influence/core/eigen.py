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
