"""Residuals already measured: ``||(C + damping I) x - v|| / ||v||`` per row, remembered with the solution.

Each residual costs one curvature product per batch of the check subset. A LiSSA solve measures its estimate
to decide whether to stop; its record and the trust report then ask about the same solution, and get the
remembered rows instead of another pass.
"""

from __future__ import annotations

import torch

#: Residuals remembered (a solve's last checks), with the solutions they are of.
RESIDUALS_KEPT = 3


class ResidualMemo:
    """The last :data:`RESIDUALS_KEPT` residuals, keyed by the solution, the right-hand sides and the damping.

    A tensor changed in place since it was measured (its ``_version`` moved) no longer matches.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, int, torch.Tensor, int, float, torch.Tensor]] = []

    def add(self, x: torch.Tensor, vectors: torch.Tensor, damping: float, rows: torch.Tensor) -> None:
        entry = (x, x._version, vectors, vectors._version, damping, rows)
        self._entries = [*self._entries[-(RESIDUALS_KEPT - 1):], entry]

    def find(self, x: torch.Tensor, vectors: torch.Tensor, damping: float) -> torch.Tensor | None:
        for seen_x, x_version, seen_v, v_version, seen_damping, rows in reversed(self._entries):
            if seen_x._version != x_version or seen_v._version != v_version or seen_damping != damping:
                continue
            if _same(seen_x, x) and _same(seen_v, vectors):
                return rows
        return None


def relative_residual(applied: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``||A x - v|| / ||v||`` per row, given ``applied = A x``."""
    return (applied - vectors).norm(dim=1) / vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
